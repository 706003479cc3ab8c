"""The planner over described hardware: strategy choice, batch arithmetic, the JSON contract.

Exact memory figures are deliberately not asserted (the memory model is being
recalibrated); only the relations every plan must keep.
"""

import json
import subprocess
import sys

import pytest

from ftlaunch.detect import hardware
from ftlaunch.models import presets as models
from ftlaunch.plan import batch, planner
from ftlaunch.plan.planner import TrainSpec

HARDWARE = ["cpu", "1xRTX4090-24GB", "1xV100-32GB", "1xA100-80GB", "4xA100-80GB",
            "8xH100-80GB", "2x8xA100-80GB"]
MODELS = ["tiny", "smollm2-135m", "qwen2.5-0.5b", "llama-3.1-8b", "gemma-2-9b", "phi-3-mini",
          "llama-3.1-70b"]
METHODS = ["auto", "lora", "qlora"]


def _plan(spec: str, model: str, **train) -> planner.Plan:
    return planner.plan(hardware.parse_spec(spec), models.resolve(model), TrainSpec(**train))


def _lora_all_linear(config: dict, rank: int) -> int:
    """LoRA parameters for target_modules="all-linear", straight from config.json's numbers:
    r * (in + out) for each linear layer of each decoder layer."""
    h, i = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    q = heads * head_dim
    kv = (config.get("num_key_value_heads") or heads) * head_dim
    if config["model_type"] == "phi3":  # fused qkv_proj and gate_up_proj
        in_plus_out = (h + q + 2 * kv) + (q + h) + (h + 2 * i) + (i + h)
    else:  # q, k, v, o; gate, up, down
        in_plus_out = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)
    return config["num_hidden_layers"] * rank * in_plus_out


def test_lora_formula_on_the_tiny_preset():
    # hidden 64, intermediate 128, 4 heads and 2 kv heads of 16, 2 layers, r=16:
    # q, k, v, o: (64+64) + 2*(64+32) + (64+64); gate, up, down: 2*(64+128) + (128+64)
    assert _lora_all_linear(models.load_presets()["tiny"]["config"], 16) == 2 * 16 * 1024
    assert _plan("cpu", "tiny").trainable_parameters == 32_768


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@pytest.mark.parametrize("spec", HARDWARE)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_plan_invariants(spec, model, method):
    hw = hardware.parse_spec(spec)
    p = planner.plan(hw, models.resolve(model), TrainSpec(method=method))

    assert p.global_batch_size == (p.per_device_batch_size * p.gradient_accumulation_steps
                                   * p.num_processes)
    assert p.per_device_batch_size >= 1 and p.gradient_accumulation_steps >= 1
    assert p.num_machines == hw.nodes
    assert p.num_processes == (hw.nodes * hw.gpus_per_node if hw.has_gpus else 1)
    assert p.method in ("lora", "qlora")
    if method != "auto":
        assert p.method == method
    assert p.engine in planner.ENGINES and p.engine != "auto"
    if not hw.has_gpus:
        assert p.engine == "cpu" and p.precision == "fp32"
    elif hw.nodes * hw.gpus_per_node == 1:
        assert p.engine == "single"
    else:
        assert p.engine in ("ddp", "fsdp", "deepspeed")
    if hw.has_gpus:
        assert p.precision == ("bf16" if hw.gpu.bf16 else "fp16")
    assert p.trainable_parameters == _lora_all_linear(models.load_presets()[model]["config"], 16)
    assert p.parameters == models.resolve(model).parameters
    assert p.reasons, "a plan always says why (chosen strategy, or what was rejected)"
    assert all(isinstance(r, str) and r for r in p.reasons)


def test_plan_is_pure_and_deterministic():
    hw = hardware.parse_spec("4xA100-80GB")
    model = models.resolve("llama-3.1-8b")
    spec = TrainSpec(seq_len=2048, global_batch_size=32)
    assert planner.plan(hw, model, spec) == planner.plan(hw, model, spec)


def test_cpu_tiny():
    p = _plan("cpu", "tiny", method="lora")
    assert p.engine == "cpu"
    assert p.method == "lora"
    assert p.fits is True
    assert p.num_processes == 1
    assert p.num_machines == 1
    assert p.on_cpu


def test_cpu_auto_tiny_picks_lora():
    p = _plan("cpu", "tiny")
    assert (p.engine, p.method, p.fits, p.num_processes) == ("cpu", "lora", True, 1)


def test_cpu_two_processes():
    p = _plan("cpu", "tiny", processes_per_node=2)
    assert p.engine == "cpu"
    assert p.num_processes == 2
    assert p.fits
    assert p.global_batch_size == p.per_device_batch_size * p.gradient_accumulation_steps * 2


def test_cpu_budget_is_shared_by_the_workers():
    one = _plan("cpu", "tiny", processes_per_node=1)
    two = _plan("cpu", "tiny", processes_per_node=2)
    assert two.budget_bytes < one.budget_bytes


@pytest.mark.parametrize("spec", ["4xA100-80GB", "8xH100-80GB", "2xRTX4090-24GB"])
@pytest.mark.parametrize("model", ["tiny", "smollm2-135m", "qwen2.5-0.5b"])
def test_multi_gpu_small_model_uses_ddp(spec, model):
    p = _plan(spec, model)
    assert p.engine == "ddp"
    assert p.fits
    assert p.num_processes == hardware.parse_spec(spec).gpus_per_node
    assert p.zero_stage is None


def test_single_gpu_engine():
    p = _plan("1xA100-80GB", "tiny")
    assert p.engine == "single"
    assert p.num_processes == 1
    assert p.fits


def test_two_nodes_of_eight():
    p = _plan("2x8xA100-80GB", "tiny")
    assert p.num_machines == 2
    assert p.num_processes == 16
    assert p.engine == "ddp"
    assert p.global_batch_size == p.per_device_batch_size * p.gradient_accumulation_steps * 16


@pytest.mark.parametrize("global_batch, spec", [(10, "4xA100-80GB"), (7, "2xA100-80GB"),
                                                (64, "8xH100-80GB"), (3, "cpu")])
def test_batch_arithmetic_holds_for_awkward_batches(global_batch, spec):
    p = _plan(spec, "tiny", global_batch_size=global_batch)
    assert p.global_batch_size == (p.per_device_batch_size * p.gradient_accumulation_steps
                                   * p.num_processes)
    if p.global_batch_size != global_batch:
        assert any("global batch" in r for r in p.reasons), p.reasons


@pytest.mark.parametrize("asked, spec, expected", [
    (3, "cpu", None), (3, "2xA100-80GB", [2, 4]), (1, "2xA100-80GB", [2]),
    (16, "3xA100-80GB", [15, 18]), (16, "2x16xA100-80GB", [32])])
def test_an_indivisible_global_batch_is_refused_when_asked_and_noted_when_a_default(
        asked, spec, expected):
    """--global-batch-size N is trained as asked or refused with the nearest multiples of the
    process count; a recipe's N is rounded to the multiple below (at least one per process)
    and the plan's summary (the table before training, too) says so."""
    from ftlaunch.show import report
    from ftlaunch.errors import UserError

    p = _plan(spec, "tiny", global_batch_size=asked)
    if expected is None:
        assert p.batch_adjusted_from is None and p.batch_note is None
        batch.check(p, asked=True)
        return
    assert batch.choices(asked, p.num_processes) == expected
    assert p.global_batch_size == expected[0] and p.batch_adjusted_from == asked
    batch.check(p, asked=False)
    assert any(f"global batch {asked} does not divide over {p.num_processes} processes: using "
               f"{p.global_batch_size}" in line for line in report.summary_lines(p))
    with pytest.raises(UserError) as refused:
        batch.check(p, asked=True)
    assert " or ".join(f"--global-batch-size {b}" for b in expected) in str(refused.value)


def test_impossible_plan_does_not_fit_and_says_why():
    p = _plan("1xRTX4090-24GB", "llama-3.1-70b", method="lora")
    assert p.fits is False
    assert p.reasons
    assert p.memory.total > p.budget_bytes
    assert p.to_json()["fits"] is False


# llama-3.1-8b on one 24 GB card, by sequence length. Each entry is (method,
# gradient_checkpointing) of the plan that fits, or None when that method does not fit.
# One GPU with --method auto tries LoRA then QLoRA without checkpointing before either with it.
@pytest.mark.parametrize("seq_len, auto, forced_lora, forced_qlora", [
    # the 16-bit base fits as is: LoRA, nothing checkpointed
    (512, ("lora", False), ("lora", False), ("qlora", False)),
    # LoRA fits only with checkpointing, QLoRA fits without: QLoRA is preferred
    (1024, ("qlora", False), ("lora", True), ("qlora", False)),
    # neither fits without checkpointing: back to LoRA, checkpointed
    (4096, ("lora", True), ("lora", True), ("qlora", True)),
    # LoRA does not fit even checkpointed: QLoRA, checkpointed
    (16384, ("qlora", True), None, ("qlora", True)),
])
def test_one_gpu_prefers_qlora_to_checkpointing_a_16bit_base(seq_len, auto, forced_lora,
                                                              forced_qlora):
    def chosen(method):
        p = _plan("1xRTX4090-24GB", "llama-3.1-8b", method=method, seq_len=seq_len)
        assert p.engine == "single"
        if method != "auto":
            assert p.method == method
        return p, ((p.method, p.gradient_checkpointing) if p.fits else None)

    auto_plan, auto_choice = chosen("auto")
    assert auto_choice == auto
    assert chosen("lora")[1] == forced_lora
    assert chosen("qlora")[1] == forced_qlora

    if auto == ("qlora", False):
        assert any("rejected SINGLE LORA" in r and "without gradient checkpointing" in r
                   for r in auto_plan.reasons), auto_plan.reasons
    if auto_plan.gradient_checkpointing:
        # nothing was preferred to checkpointing when the chosen plan checkpoints itself
        assert not any("is preferred to checkpointing" in r for r in auto_plan.reasons), \
            auto_plan.reasons


def test_bigger_card_never_fits_less():
    small = _plan("1xRTX4090-24GB", "llama-3.1-8b", method="lora")
    big = _plan("1xA100-80GB", "llama-3.1-8b", method="lora")
    assert big.budget_bytes > small.budget_bytes
    assert big.fits or not small.fits


def test_qlora_weights_smaller_than_lora_weights():
    lora = _plan("1xA100-80GB", "llama-3.1-8b", method="lora")
    qlora = _plan("1xA100-80GB", "llama-3.1-8b", method="qlora")
    assert qlora.memory.weights < lora.memory.weights


# --- the JSON contract -------------------------------------------------------------------

CONTRACT = {
    "model": {"id": str, "parameters": int, "trainable_parameters": int},
    "hardware": {"nodes": int, "gpus_per_node": int, "gpu_name": (str, type(None)),
                 "gpu_memory_bytes": int},
    "method": str,
    "engine": str,
    "zero_stage": (int, type(None)),
    "num_processes": int,
    "num_machines": int,
    "per_device_batch_size": int,
    "gradient_accumulation_steps": int,
    "global_batch_size": int,
    "seq_len": int,
    "gradient_checkpointing": bool,
    "memory": {"per_device_peak_bytes": int, "budget_bytes": int, "weights": int, "adapter": int,
               "gradients": int, "optimizer": int, "activations": int, "overhead": int},
    "fits": bool,
    "reasons": list,
}


def _check_contract(data: dict, contract: dict, where: str = "") -> None:
    for key, expected in contract.items():
        assert key in data, f"plan JSON lacks {where}{key}"
        value = data[key]
        if isinstance(expected, dict):
            assert isinstance(value, dict), f"{where}{key} should be an object"
            _check_contract(value, expected, f"{where}{key}.")
            continue
        types = expected if isinstance(expected, tuple) else (expected,)
        if bool not in types and isinstance(value, bool):
            raise AssertionError(f"{where}{key} is a bool, expected {types}")
        assert isinstance(value, types), f"{where}{key}={value!r} is not {types}"


@pytest.mark.parametrize("spec, model, train", [
    ("cpu", "tiny", {}),
    ("cpu", "tiny", {"processes_per_node": 2}),
    ("1xRTX4090-24GB", "llama-3.1-8b", {}),
    ("4xA100-80GB", "llama-3.1-70b", {"method": "lora"}),
    ("2x8xA100-80GB", "qwen2.5-0.5b", {}),
    ("1xRTX4090-24GB", "llama-3.1-70b", {"method": "lora"}),
])
def test_to_json_contract(spec, model, train):
    p = _plan(spec, model, **train)
    data = p.to_json()
    _check_contract(data, CONTRACT)
    assert json.loads(json.dumps(data)) == data  # plain JSON, nothing exotic
    hw = hardware.parse_spec(spec)
    assert data["model"]["id"] == model
    assert data["model"]["parameters"] == models.resolve(model).parameters
    assert data["hardware"]["nodes"] == hw.nodes
    assert data["hardware"]["gpus_per_node"] == hw.gpus_per_node
    assert data["hardware"]["gpu_name"] == (hw.gpu.name if hw.gpu else None)
    assert data["num_processes"] == p.num_processes
    assert data["global_batch_size"] == (data["per_device_batch_size"]
                                         * data["gradient_accumulation_steps"]
                                         * data["num_processes"])
    mem = data["memory"]
    # every term of the breakdown; cuda_context is part of overhead, not a term of its own
    terms = ("weights", "adapter", "gradients", "optimizer", "activations", "logits", "overhead")
    assert all(mem[t] >= 0 for t in terms)
    assert mem["per_device_peak_bytes"] == sum(mem[t] for t in terms)
    assert 0 <= mem["cuda_context"] <= mem["overhead"]
    assert all(isinstance(r, str) for r in data["reasons"])


def test_planning_path_does_not_import_torch():
    out = subprocess.run(
        [sys.executable, "-c",
         "import ftlaunch.plan.planner, ftlaunch.plan.job, ftlaunch.cli, sys; print('torch' in sys.modules)"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_making_a_plan_does_not_import_torch():
    """Nor the training stack: the plan, the Trainer's arguments and the run record are
    all made in the launcher before anything heavy is imported (docs/ARCHITECTURE.md)."""
    code = ("import sys; from ftlaunch.detect import hardware; "
            "from ftlaunch.models import presets as models; from ftlaunch.plan import planner; "
            "import ftlaunch.plan.job, ftlaunch.plan.trainer_args, ftlaunch.plan.estimate, "
            "ftlaunch.run.record; "
            "p = planner.plan(hardware.parse_spec('8xH100-80GB'), models.resolve('llama-3.1-70b'), "
            "planner.TrainSpec()); p.to_json(); "
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("spec, model, method, seq_len", [
    ("1xRTX4090-24GB", "llama-3.1-70b", "lora", 2048),
    ("1xRTX4090-24GB", "llama-3.1-8b", "lora", 16384),
    ("1xA100-40GB", "qwen2.5-32b", "lora", 4096),
    ("2xRTX4090-24GB", "llama-3.1-70b", "qlora", 16384),
])
def test_would_fit_hints_are_plans_that_fit(spec, model, method, seq_len):
    import re

    p = _plan(spec, model, method=method, seq_len=seq_len)
    assert not p.fits
    hints = [r for r in p.reasons if r.startswith("would fit")]
    assert hints, p.reasons
    for hint in hints:
        kwargs = {"method": method, "seq_len": seq_len}
        if m := re.search(r"--method (\w+)", hint):
            kwargs["method"] = m.group(1)
        if m := re.search(r"--seq-len (\d+)", hint):
            kwargs["seq_len"] = int(m.group(1))
        hw_spec = spec
        if m := re.search(r"--gpus (\d+)", hint):
            hw_spec = re.sub(r"^\d+x", f"{m.group(1)}x", spec)
        elif m := re.search(r"(\d+) nodes of 8", hint):
            hw_spec = f"{m.group(1)}x8x" + spec.split("x", 1)[1]
        assert _plan(hw_spec, model, **kwargs).fits, (hint, hw_spec, kwargs)


def test_gradient_checkpointing_can_be_asked_for_or_refused():
    """--gradient-checkpointing / --no-...: the plan keeps the user's choice and counts its
    memory; auto turns it on only when needed."""
    train = dict(method="qlora", seq_len=2048, global_batch_size=2)
    auto = _plan("1xH100-80GB", "llama-8b", **train)
    forced = _plan("1xH100-80GB", "llama-8b", gradient_checkpointing=True, **train)
    assert not auto.gradient_checkpointing and forced.gradient_checkpointing
    assert forced.per_device_batch_size == 2 and forced.fits
    assert forced.memory.activations < auto.memory.activations / 4
    # Where only checkpointing makes the batch fit, refusing it means a smaller
    # micro-batch (or no fit), never a silent checkpointing.
    tight = dict(method="lora", seq_len=4096, global_batch_size=8)
    needs = _plan("1xRTX4090-24GB", "llama-8b", **tight)
    refused = _plan("1xRTX4090-24GB", "llama-8b", gradient_checkpointing=False, **tight)
    assert needs.gradient_checkpointing and not refused.gradient_checkpointing
    assert not refused.fits or refused.per_device_batch_size < needs.per_device_batch_size


def test_gradient_checkpointing_flag_reaches_the_plan(tmp_path):
    import json

    from conftest import run_ftlaunch

    proc = run_ftlaunch("plan", "--model", "llama-8b", "--hardware", "1xH100-80GB", "--method",
                        "qlora", "--seq-len", "2048", "--global-batch-size", "2",
                        "--gradient-checkpointing", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["gradient_checkpointing"] is True
    refused = run_ftlaunch("--model", "tiny", "--set", "gradient_checkpointing=true",
                           "--dry-run", "--output-dir", str(tmp_path / "run"))
    assert refused.returncode == 2 and "--gradient-checkpointing" in refused.stderr


def test_the_peak_at_a_shorter_row_length_is_what_unpadded_rows_need():
    """Unpacked data is padded to each batch's longest example: the launcher's note."""
    spec = TrainSpec(seq_len=128, global_batch_size=8, processes_per_node=1)
    model = models.resolve("smollm2-135m")
    plan = planner.plan(hardware.parse_spec("cpu"), model, spec)
    assert planner.peak_at_row_length(plan, model, spec, 128) == plan.memory.total
    assert planner.peak_at_row_length(plan, model, spec, 53) < 0.7 * plan.memory.total
