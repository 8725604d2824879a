"""Measuring a MoD checkpoint against its base: quality (`quality`, `tasks`, `last_word`), speed and memory
(`benchmark`), pictures (`plots`) and generations side by side (`chat`); `loading` is what they share."""
