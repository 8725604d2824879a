"""Router training (routers / LoRA recipes), the load objective, calibration, resume, and distributed runs."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from helpers import train_settings
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from modification.cli.main import main as cli
from modification.conversion.calibrate import calibrate_checkpoint
from modification.conversion.data import DataError
from modification.conversion.settings import CalibrateSettings
from modification.conversion.train import train
from modification.modeling import MoDForCausalLM


def test_router_recipe_changes_only_routers(text_ckpt, tmp_path):
    mod, train_file, _ = text_ckpt
    (mod / "LICENSE").write_text("base licence")
    out = train(train_settings(mod, tmp_path / "out", train_file, recipe="routers", steps=3, kv_fraction=0.8))
    for name in ("tokenizer.json", "tokenizer_config.json", "LICENSE"):  # travel byte for byte
        assert (out / name).read_bytes() == (mod / name).read_bytes(), name
    results = json.loads((out / "results.json").read_text())
    # published with the checkpoint: folders outside the working directory are named, not given as local paths
    assert results["model"]["name_or_path"] == "out" and results["training"]["initial_checkpoint"] == "mod"
    assert results["training"]["data"] == [train_file.name]
    before, after = load_file(mod / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(".router." in k for k in changed)
    assert {k for k in before if ".router." in k} == set(changed)
    # the budget, held: each routed layer (1 and 3 of 4) at its share of the plan brought to a KV fraction of 0.8
    saved = json.loads((out / "config.json").read_text())
    assert saved["load_loss_target"] == pytest.approx([0.6, 0.6])
    assert saved["routing_plan"]["routed_share"] == pytest.approx([0.6, 0.6])
    assert results["training"]["kv_fraction"] == 0.8


def test_lora_adapter_round_trips_and_merged_checkpoint_matches(text_ckpt, tmp_path):
    from peft import PeftModel

    mod, train_file, _ = text_ckpt
    out = train(train_settings(mod, tmp_path / "out", train_file, recipe="lora", steps=3, learning_rate=1e-2,
                          save_adapter=True))
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    original = MoDForCausalLM.from_pretrained(mod).eval()
    with torch.no_grad():
        original_logits = original(ids).logits
    unmerged = PeftModel.from_pretrained(original, out / "adapter").eval()
    with torch.no_grad():
        merged_logits, unmerged_logits = merged(ids).logits, unmerged(ids).logits
    assert (merged_logits - unmerged_logits).abs().max().item() <= 1e-5
    assert (merged_logits - original_logits).abs().max().item() > 1e-3  # LoRA and routers did change the model
    record = json.loads((out / "results.json").read_text())["training"]
    assert record["recipe"] == "lora" and record["steps"] == 3


def test_load_objective_lowers_the_kv_fraction_on_real_text(text_ckpt, tmp_path):
    mod, train_file, _ = text_ckpt
    settings = train_settings(mod, tmp_path / "out", train_file, recipe="routers", steps=25, load_loss_coef=1.0,
                         router_learning_rate=0.05, logging_steps=5)
    out = train(settings)
    log = [row for row in json.loads((out / "training_log.json").read_text()) if "kv_fraction" in row]
    assert log[0]["step"] == 1 and "routed/layer_1" in log[0] and "gate/layer_1" in log[0]
    assert log[0]["kv_fraction"] == 1.0
    assert log[-1]["kv_fraction"] < 0.9
    assert all(torch.isfinite(torch.tensor(row["lm_loss"])) for row in log)


def test_calibration_hits_target_on_held_out_text(text_ckpt, tmp_path):
    mod, train_file, held_file = text_ckpt
    trained = train(train_settings(mod, tmp_path / "trained", train_file, recipe="routers", steps=25,
                                   load_loss_coef=1.0, router_learning_rate=0.05))
    settings = CalibrateSettings(model=str(trained), out=str(tmp_path / "cal"), kv_fraction=0.8,
                                 data=[str(train_file)], seq_len=128, max_blocks=24, held_out_fraction=0.0,
                                 progress=False)
    record = calibrate_checkpoint(settings)
    assert abs(record["measured"]["kv_fraction"] - 0.8) < 0.01
    # held-out text: works the calibration never saw
    model = MoDForCausalLM.from_pretrained(tmp_path / "cal").eval()
    from transformers import AutoTokenizer

    from modification.conversion.data import load_blocks

    tok = AutoTokenizer.from_pretrained(tmp_path / "cal", config=model.config)
    blocks = load_blocks([str(held_file)], tok, 128, progress=False)[0]
    assert blocks.shape[0] > 100
    with torch.no_grad():
        fraction = model(blocks, output_router_logits=True).routed_fraction.mean().item()
    assert abs(fraction - 0.8) <= 0.02
    results = json.loads((tmp_path / "cal" / "results.json").read_text())
    assert results["training"]["recipe"] == "routers"  # kept from training, with the new routing
    assert results["routing"]["calibration"]["budget"] == {"kv_fraction": 0.8}
    saved = json.loads((tmp_path / "cal" / "config.json").read_text())
    assert saved["calibration"]["budget"] == {"kv_fraction": 0.8}
    assert isinstance(saved["router_threshold"], list)
    # no fit's plan: the budget spread evenly over the routed layers, and stored as the checkpoint's plan
    assert saved["routing_plan"]["routed_share"] == pytest.approx([0.6, 0.6])


def test_resume_continues_from_saved_step(text_ckpt, tmp_path):
    mod, train_file, _ = text_ckpt
    ckpts = tmp_path / "ckpts"
    settings = train_settings(mod, tmp_path / "full", train_file, recipe="routers", steps=4, save_steps=2,
                         router_learning_rate=0.05, load_loss_coef=1.0, checkpoint_dir=str(ckpts))
    full = train(settings)
    saved = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("checkpoint-"))
    assert saved == ["checkpoint-2", "checkpoint-4"]
    with pytest.raises(FileExistsError, match="--resume"):
        train(replace(settings, out=str(tmp_path / "again")))
    import shutil

    shutil.rmtree(ckpts / "checkpoint-4")  # as if the run had stopped after step 2
    resumed = train(replace(settings, out=str(tmp_path / "resumed"), resume=True))
    steps = [row["step"] for row in json.loads((resumed / "training_log.json").read_text()) if "loss" in row]
    assert steps == [1, 2, 3, 4]  # the history of steps 1-2 comes from the checkpoint, 3-4 from this run
    record = json.loads((resumed / "results.json").read_text())["training"]
    assert record["resumed_from"].endswith("checkpoint-2") and record["steps_this_run"] == 2
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(replace(settings, out=str(tmp_path / "x"), checkpoint_dir=str(tmp_path / "empty"), resume=True))


def test_two_process_accelerate_run(text_ckpt, tmp_path):
    mod, train_file, _ = text_ckpt
    cmd = [
        # --multi_gpu selects accelerate's torchrun launcher; on a machine without GPUs the Trainer (use_cpu) then
        # runs data-parallel over CPU processes with gloo. (`--cpu` alone would start a single process.)
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "modification.cli",
        "train", "--model", str(mod), "--out", str(tmp_path / "ddp"), "--data", str(train_file),
        # LoRA with the default objective, self-distillation: each step's teacher pass (adapters disabled, routing
        # dense) runs through the DDP-wrapped model on both ranks
        "--recipe", "lora", "--steps", "3", "--seq-len", "64", "--batch-size", "2", "--learning-rate", "0.01",
        "--router-learning-rate", "0.05", "--load-loss-coef", "1.0", "--kv-fraction", "0.8", "--lm-weight", "0.5",
        "--eval-fraction", "0.05", "--eval-steps", "2", "--save-steps", "2",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((tmp_path / "ddp" / "results.json").read_text())["training"]
    assert record["world_size"] == 2
    assert record["tokens"] == 3 * 2 * 2 * 64
    assert record["distill_weight"] == 1.0 and record["completed_steps"] == 3
    log = json.loads((tmp_path / "ddp" / "training_log.json").read_text())
    assert all("kl_loss" in row and "lm_loss" in row for row in log if "loss" in row)
    assert [row["step"] for row in log if "eval_kl_loss" in row] == [0, 2, 3]
    before, after = load_file(mod / "model.safetensors"), load_file(tmp_path / "ddp" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if ".router." in k)
    assert any(not torch.equal(before[k], after[k]) for k in before if "q_proj" in k)  # LoRA, merged
    # the checkpoint loads as published, and so does the one the run saved at step 2
    ids = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp", trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    saved = tmp_path / "ddp-checkpoints" / "checkpoint-2"
    assert (saved / "trainer_state.json").is_file() and (saved / "adapter_model.safetensors").is_file()
    # a time budget stops both processes at the same step (the main process's clock decides), and the output is saved
    cmd[cmd.index(str(tmp_path / "ddp"))] = str(tmp_path / "timed")
    proc = subprocess.run([*cmd, "--max-minutes", "0.000001"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((tmp_path / "timed" / "results.json").read_text())["training"]
    assert record["stopped_by"] == "max_minutes" and record["completed_steps"] == 1
    assert (tmp_path / "timed-checkpoints" / "checkpoint-1" / "trainer_state.json").is_file()


def test_bad_training_input_gives_clear_errors(text_ckpt, tmp_path, capsys):
    mod, train_file, _ = text_ckpt
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(DataError, match="fewer than seq_len"):
        train(train_settings(mod, tmp_path / "o1", empty))
    with pytest.raises(DataError, match="does not exist"):
        train(train_settings(mod, tmp_path / "o2", tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        train(train_settings(mod, tmp_path / "o3", train_file, seq_len=4096))
    base_dir = mod.parent / "base"
    assert cli(["train", "--model", str(base_dir), "--out", str(tmp_path / "o4"), "--data", str(train_file)]) == 2
    assert "not a MoD checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]
