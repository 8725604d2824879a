"""Every test runs in a neutral Hugging Face environment, whatever the user has set (offline mode, another endpoint,
a token): tests that want offline mode or an endpoint set it themselves."""

from __future__ import annotations

import os
import sys

import pytest

# Variables that change where the Hub is, whether it may be reached, and with which token.
HF_VARIABLES = (
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "HF_ENDPOINT",
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_DISABLE_XET", "HF_HUB_DISABLE_IMPLICIT_TOKEN",
)


@pytest.fixture(autouse=True, scope="session")
def neutral_hugging_face_environment():
    """Remove the Hub variables from os.environ (subprocesses inherit it) and reset what huggingface_hub, datasets
    and evaluate read from them when imported. Session-scoped, so that module-scoped fixtures (which pytest sets up
    before any function-scoped one) see it too; a test's own monkeypatch restores this state afterwards.

    HF_HOME and HF_HUB_CACHE are left alone: they only say where the caches are, and the tests that need a cache of
    their own set them (or pass `cache_dir`)."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as patch:
        for name in HF_VARIABLES:
            patch.delenv(name, raising=False)
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        patch.setattr(constants, "ENDPOINT", constants._HF_DEFAULT_ENDPOINT)
        patch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                      constants._HF_DEFAULT_ENDPOINT + "/{repo_id}/resolve/{revision}/{filename}")
        patch.setattr(constants, "HF_TOKEN_PATH", os.path.join(constants.HF_HOME, "token"))
        patch.setattr(constants, "HF_STORED_TOKENS_PATH", os.path.join(constants.HF_HOME, "stored_tokens"))
        patch.setattr(constants, "HF_HUB_DISABLE_XET", False)
        patch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
        # datasets and evaluate read their offline flags when imported; most tests import them later (clean).
        for module, names in (("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
                              ("evaluate.config", ("HF_EVALUATE_OFFLINE",))):
            for name in names if module in sys.modules else ():
                patch.setattr(sys.modules[module], name, False)
        yield


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    """A tiny MoD checkpoint with its tokenizer and train / held-out text (`helpers.text_mod_checkpoint`), one per
    test module."""
    from helpers import text_mod_checkpoint

    return text_mod_checkpoint(tmp_path_factory.mktemp("textmod"))
