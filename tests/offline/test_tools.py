"""The offline tools (`grow expand`, `import-hf`, `export-hf`) on what a user brings: growth
keeps the function at every preserving operator's defaults and says so with a figure,
outputs are never destroyed, damaged inputs are named in one line, shapes transformers
cannot load are refused before anything is written, and msg checkpoints export only in a
way the user chose. Real transformers models (random weights, fp32, eager attention)."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from growth_ops import MaskState, ModelSpec
from orchestrator.checkpoint.canonical import load_checkpoint
from orchestrator.cli import main
from orchestrator.commands.run_job import precheck as _precheck
from orchestrator.model import build_model
from orchestrator.offline.outputs import write_checkpoint_dir, write_safetensors_stream

from ..conftest import REPO, grow_cmd, hf_logits, random_llama

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOKENS = torch.randint(0, 29, (2, 13), generator=torch.Generator().manual_seed(7))


def save_llama(path, *, hidden=32, heads=4, kv_heads=2, head_dim=None, ffn=48, layers=2, vocab=29, tied=True,
               seed=0):
    """A random LlamaForCausalLM (conftest's random_llama) saved with save_pretrained."""
    model = random_llama(vocab=vocab, hidden=hidden, heads=heads, kv_heads=kv_heads, ffn=ffn, layers=layers,
                         head_dim=head_dim, tied=tied, seed=seed)
    model.save_pretrained(path)
    return model


def our_logits(ckpt, tokens=TOKENS):
    state, _, meta = load_checkpoint(ckpt)
    model = build_model(ModelSpec.from_dict(meta["spec"]))
    model.load_canonical(state)
    model.set_masks(MaskState.from_dict(meta["masks"]))
    with torch.no_grad():
        return model(tokens)


def grow(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def imported(tmp_path, capsys):
    """(hf model, its directory, the imported canonical checkpoint)"""
    hf = save_llama(tmp_path / "hf")
    assert grow(capsys, "import-hf", f"src={tmp_path / 'hf'}", f"out={tmp_path / 'ckpt'}")[0] == 0
    return hf, tmp_path / "hf", tmp_path / "ckpt"


def leftovers(directory):
    return [p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# -- 1. msg preserves at its defaults, offline and in a run ----------------------------------

def test_msg_expand_keeps_the_function_at_its_defaults(imported, tmp_path, capsys):
    hf, _, ckpt = imported
    code, out, _ = grow(capsys, "expand", f"ckpt={ckpt}", f"out={tmp_path / 'g'}", "growth=msg", "hidden=48",
                        "ffn=64", "layers=3")
    assert code == 0
    meta = json.loads((tmp_path / "g" / "meta.json").read_text())
    assert meta["masks"]["ramp_steps"] == 40 and meta["masks"]["steps_done"] == 0  # conf/growth/msg.yaml's
    record = meta["offline_growth"]
    assert record["preserves_function"] is True and record["layer_insert"] == "interleave"
    assert record["check"]["within_tolerance"] and record["check"]["max_abs_logit_diff"] <= 1e-6
    assert "check: max |logit diff|" in out and "function preserved" in out
    torch.testing.assert_close(our_logits(tmp_path / "g"), hf_logits(hf, TOKENS), rtol=0, atol=1e-5)


@pytest.mark.parametrize("ramp,why", [("0", "ramp_steps: 0 is not allowed for msg"),
                                      ("-1", "ramp_steps: -1 is not allowed; allowed: >= 0")])
def test_msg_without_a_ramp_is_refused_offline(imported, tmp_path, capsys, ramp, why):
    code, _, err = grow(capsys, "expand", f"ckpt={imported[2]}", f"out={tmp_path / 'g'}", "growth=msg",
                        "hidden=48", f"ramp_steps={ramp}")
    assert code == 2 and err.count("\n") == 1 and why in err, err
    assert not (tmp_path / "g").exists() and not leftovers(tmp_path)


def test_msg_without_a_ramp_is_refused_in_a_run(capsys):
    assert _precheck(["schedule.stages.1.growth.ramp_steps=0"]) == 2
    err = capsys.readouterr().err
    assert "schedule.stages.1.growth.ramp_steps: 0 is not allowed for msg" in err and "live at once" in err


def test_a_run_refuses_to_start_from_a_mid_ramp_msg_checkpoint(imported, tmp_path, capsys):
    assert grow(capsys, "expand", f"ckpt={imported[2]}", f"out={tmp_path / 'g'}", "growth=msg", "hidden=64")[0] == 0
    assert _precheck(["schedule=tiny", f"init_from={tmp_path / 'g'}"]) == 2
    assert "init_from: " in capsys.readouterr().err


def test_ramp_steps_is_refused_for_operators_without_masks(imported, tmp_path, capsys):
    code, _, err = grow(capsys, "expand", f"ckpt={imported[2]}", f"out={tmp_path / 'g'}", "growth=zero",
                        "hidden=48", "ramp_steps=5")
    assert code == 2 and "ramp_steps: zero uses no masks; allowed: 0" in err


# -- 2. the check after growth ---------------------------------------------------------------

def test_stack_is_measured_and_recorded_as_not_preserving(imported, tmp_path, capsys):
    code, out, err = grow(capsys, "expand", f"ckpt={imported[2]}", f"out={tmp_path / 'g'}", "growth=stack",
                          "layers=4")
    assert code == 0
    record = json.loads((tmp_path / "g" / "meta.json").read_text())["offline_growth"]
    assert record["preserves_function"] is False and record["check"]["max_abs_logit_diff"] > 1e-3
    assert "function changed (not preserving)" in out and "stack does not preserve the function" in err


def test_a_preserving_growth_outside_its_tolerance_is_refused_and_writes_nothing(imported, tmp_path, capsys):
    # zero rescales the residual stream: exact in real numbers, ~1e-7 off in fp32; tolerance=0 refuses that
    code, _, err = grow(capsys, "expand", f"ckpt={imported[2]}", f"out={tmp_path / 'g'}", "growth=zero",
                        "hidden=48", "tolerance=0")
    assert code == 3 and "growth with zero changed the function: max |logit diff|" in err, err
    assert not (tmp_path / "g").exists() and not leftovers(tmp_path)


def test_check_can_be_skipped_and_the_record_says_so(imported, tmp_path, capsys):
    code, _, err = grow(capsys, "expand", f"ckpt={imported[2]}", f"out={tmp_path / 'g'}", "growth=clone",
                        "hidden=64", "check=false")
    assert code == 0 and "check=false" in err
    assert json.loads((tmp_path / "g" / "meta.json").read_text())["offline_growth"]["check"] is None


# -- 3. outputs ------------------------------------------------------------------------------

def test_outputs_are_never_destroyed_without_overwrite(imported, tmp_path, capsys):
    _, hf_dir, ckpt = imported
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    for args in (["import-hf", f"src={hf_dir}"], ["expand", f"ckpt={ckpt}", "growth=zero", "hidden=48"],
                 ["export-hf", f"ckpt={ckpt}"]):
        code, _, err = grow(capsys, *args, f"out={busy}")
        assert code == 2 and "exists and is not empty; pass overwrite=true" in err, (args, err)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    assert grow(capsys, "export-hf", f"ckpt={ckpt}", f"out={busy}", "overwrite=true")[0] == 0
    assert sorted(p.name for p in busy.iterdir()) == ["config.json", "model.safetensors"]
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_an_offline_tool_never_writes_over_its_input(imported, tmp_path, capsys, where):
    _, hf_dir, ckpt = imported
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    out = {"same": ckpt, "parent": tmp_path, "inside": ckpt / "sub"}[where]
    for args in (["expand", f"ckpt={ckpt}", "growth=zero", "hidden=48"], ["export-hf", f"ckpt={ckpt}"]):
        code, _, err = grow(capsys, *args, f"out={out}", "overwrite=true")
        assert code == 2 and "never writes over its input" in err, err
    assert grow(capsys, "import-hf", f"src={hf_dir}", f"out={hf_dir}", "overwrite=true")[0] == 2
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before


def test_a_crash_during_export_leaves_the_previous_export_whole(imported, tmp_path, capsys):
    _, _, ckpt = imported
    assert grow(capsys, "expand", f"ckpt={ckpt}", f"out={tmp_path / 'big'}", "growth=zero", "hidden=48")[0] == 0
    assert grow(capsys, "export-hf", f"ckpt={ckpt}", f"out={tmp_path / 'hf_out'}")[0] == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf_out").iterdir()}
    env = {**os.environ, "GROW_FAILPOINTS": "offline.written", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(grow_cmd("export-hf", f"ckpt={tmp_path / 'big'}", f"out={tmp_path / 'hf_out'}",
                                   "overwrite=true"), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf_out").iterdir()} == before
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf_out").hidden_size == 32


# -- 4. integrity ----------------------------------------------------------------------------

def test_altered_bytes_are_refused_by_expand_and_export(imported, tmp_path, capsys):
    ckpt = imported[2]
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    data[start:start + 4] = struct.pack("<f", float("nan"))  # same size, one weight now NaN
    f.write_bytes(bytes(data))
    for args in (["expand", "growth=zero", "hidden=48"], ["export-hf"]):
        code, _, err = grow(capsys, *args, f"ckpt={ckpt}", f"out={tmp_path / 'o'}")
        assert code == 1 and err.count("\n") == 1 and "model.safetensors does not match its checksum" in err, err
        assert not (tmp_path / "o").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "directory", "shape", "src-is-a-file", "no-config-key"])
def test_bad_hf_inputs_are_one_line_and_leave_nothing(imported, tmp_path, capsys, damage):
    src = imported[1]
    weights, config = src / "model.safetensors", src / "config.json"
    cfg = json.loads(config.read_text())
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "directory":
        weights.unlink()
        weights.mkdir()
    elif damage == "shape":  # found while streaming, after the temp dir exists
        config.write_text(json.dumps({**cfg, "num_hidden_layers": 1, "intermediate_size": 40}))
    elif damage == "no-config-key":
        config.write_text(json.dumps({k: v for k, v in cfg.items() if k != "num_attention_heads"}))
    arg = f"src={config}" if damage == "src-is-a-file" else f"src={src}"
    code, _, err = grow(capsys, "import-hf", arg, f"out={tmp_path / 'o'}")
    expect = {"truncated": "damaged or truncated", "directory": "is missing or not a file",
              "shape": "has shape (48, 32), config says (40, 32)", "src-is-a-file": "is not a directory",
              "no-config-key": "config.json: num_attention_heads: missing"}[damage]
    assert code == 2 and err.count("\n") == 1 and expect in err, err
    assert not (tmp_path / "o").exists() and not leftovers(tmp_path)


# -- 5. shapes -------------------------------------------------------------------------------

def test_shape_values_name_their_key(imported, tmp_path, capsys):
    ckpt = imported[2]
    for arg, why in (("hidden=abc", "hidden: 'abc' is not an integer"),
                     ("hidden=36", "hidden: 36 is not a multiple of head_dim=8"),
                     ("hidden=0", "hidden: 0 is not allowed; allowed: >= 1")):
        code, _, err = grow(capsys, "expand", f"ckpt={ckpt}", f"out={tmp_path / 'o'}", "growth=zero", arg)
        assert code == 2 and why in err, err


def test_a_shape_transformers_cannot_load_is_refused_before_writing(imported, tmp_path, capsys):
    code, _, err = grow(capsys, "expand", f"ckpt={imported[2]}", f"out={tmp_path / 'g'}", "growth=zero",
                        "hidden=40", "heads=6")
    assert code == 0 and "export-hf will refuse it" in err  # our model runs it: head_dim stays 8
    code, _, err = grow(capsys, "export-hf", f"ckpt={tmp_path / 'g'}", f"out={tmp_path / 'o'}")
    assert code == 2 and "model.hidden: 40 is not a multiple of heads=6" in err
    assert not (tmp_path / "o").exists() and not leftovers(tmp_path)


# -- 6. msg checkpoints and export -----------------------------------------------------------

def test_a_mid_ramp_msg_checkpoint_exports_only_as_chosen(imported, tmp_path, capsys):
    hf, _, ckpt = imported
    assert grow(capsys, "expand", f"ckpt={ckpt}", f"out={tmp_path / 'g'}", "growth=msg", "hidden=48", "ffn=64",
                "heads=6", "kv_heads=3", "layers=3")[0] == 0
    code, _, err = grow(capsys, "export-hf", f"ckpt={tmp_path / 'g'}", f"out={tmp_path / 'o'}")
    assert code == 2 and "masks: the checkpoint was grown with msg" in err and "masks=drop" in err
    assert not (tmp_path / "o").exists()
    assert grow(capsys, "export-hf", f"ckpt={tmp_path / 'g'}", f"out={tmp_path / 'o'}", "masks=bogus")[0] == 2
    code, out, _ = grow(capsys, "export-hf", f"ckpt={tmp_path / 'g'}", f"out={tmp_path / 'o'}", "masks=drop")
    assert code == 0 and "layers=2 hidden=32 heads=4/2" in out  # the model before growth
    torch.testing.assert_close(hf_logits(tmp_path / "o", TOKENS), hf_logits(hf, TOKENS), rtol=0, atol=1e-5)
    # masks=drop where there is nothing masked is refused: the new structure is the function
    code, _, err = grow(capsys, "export-hf", f"ckpt={ckpt}", f"out={tmp_path / 'o2'}", "masks=drop")
    assert code == 2 and "nothing to drop" in err


@pytest.mark.parametrize("steps_done", [2, 5])
def test_an_msg_checkpoint_later_in_its_ramp(imported, tmp_path, capsys, steps_done):
    """At the end of the ramp (5/5) it exports as it is; mid-ramp (2/5) only with masks=drop,
    which warns that the export is the model before growth, not the checkpoint's function."""
    hf, _, ckpt = imported
    assert grow(capsys, "expand", f"ckpt={ckpt}", f"out={tmp_path / 'g'}", "growth=msg", "hidden=48",
                "layers=3", "ramp_steps=5")[0] == 0
    state, _, meta = load_checkpoint(tmp_path / "g")
    meta["masks"]["steps_done"] = steps_done  # as training leaves it

    def files(tmp):
        write_safetensors_stream(tmp / "model.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in state.items()],
                                 state.items())
        write_safetensors_stream(tmp / "optimizer.safetensors", [], iter(()))
    write_checkpoint_dir(tmp_path / "later", files, {k: v for k, v in meta.items() if k != "format"})
    if steps_done == 5:
        assert grow(capsys, "export-hf", f"ckpt={tmp_path / 'later'}", f"out={tmp_path / 'o'}")[0] == 0
        torch.testing.assert_close(hf_logits(tmp_path / "o", TOKENS), our_logits(tmp_path / "later"),
                                   rtol=0, atol=1e-5)
        return
    code, _, err = grow(capsys, "export-hf", f"ckpt={tmp_path / 'later'}", f"out={tmp_path / 'o'}")
    assert code == 2 and "masks are at 0.4 (2/5 steps)" in err and "3 more steps" in err, err
    code, _, err = grow(capsys, "export-hf", f"ckpt={tmp_path / 'later'}", f"out={tmp_path / 'o'}", "masks=drop")
    assert code == 0 and "not this checkpoint's current function" in err
    torch.testing.assert_close(hf_logits(tmp_path / "o", TOKENS), hf_logits(hf, TOKENS), rtol=0, atol=1e-5)


# -- the property: import -> expand (each preserving operator, defaults) -> export -----------

@st.composite
def llama_shapes(draw):
    kv_heads = draw(st.sampled_from([1, 2, 3]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 3]))  # GQA ratios 1..3, odd head counts
    head_dim = draw(st.sampled_from([4, 6, 8]))
    hidden = heads * draw(st.sampled_from([head_dim, head_dim + 2, 6]))  # head_dim != hidden / heads too
    return dict(hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                ffn=draw(st.sampled_from([12, 20])), layers=draw(st.sampled_from([1, 2])),
                tied=draw(st.booleans()), seed=draw(st.integers(0, 1000)))


def targets(s: dict) -> dict[str, list[str]]:
    """Per preserving operator, a larger shape transformers can load (hidden a multiple of heads)."""
    heads = s["heads"] + s["kv_heads"]  # one more query head per kv group
    wide = [f"heads={heads}", f"kv_heads={s['kv_heads']}", f"hidden={heads * (s['hidden'] // s['heads'] + 1)}",
            f"ffn={s['ffn'] + 5}", f"layers={s['layers'] + 1}"]
    clone = [f"hidden={2 * s['hidden']}", f"heads={2 * s['heads']}", f"kv_heads={2 * s['kv_heads']}",
             f"ffn={2 * s['ffn']}", f"layers={s['layers'] + 1}"]
    return {"msg": wide, "zero": wide, "clone": clone}


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(shape=llama_shapes())
@example(shape=dict(hidden=24, heads=3, kv_heads=1, head_dim=6, ffn=12, layers=2, tied=False, seed=1))
@example(shape=dict(hidden=18, heads=3, kv_heads=3, head_dim=8, ffn=20, layers=1, tied=True, seed=2))
def test_import_expand_export_keeps_transformers_logits(tmp_path_factory, shape):
    tmp = tmp_path_factory.mktemp("prop")
    hf = save_llama(tmp / "hf", hidden=shape["hidden"], heads=shape["heads"], kv_heads=shape["kv_heads"],
                    head_dim=shape["head_dim"], ffn=shape["ffn"], layers=shape["layers"], tied=shape["tied"],
                    seed=shape["seed"])
    want = hf_logits(hf, TOKENS)
    assert main(["import-hf", f"src={tmp / 'hf'}", f"out={tmp / 'ckpt'}"]) == 0
    worst = 0.0
    for op, args in targets(shape).items():
        assert main(["expand", f"ckpt={tmp / 'ckpt'}", f"out={tmp / op}", f"growth={op}", *args]) == 0, (op, args)
        # the grown checkpoint itself (msg: with its masks at 0) computes transformers' logits
        torch.testing.assert_close(our_logits(tmp / op), want, rtol=0, atol=1e-5, msg=lambda m: f"{op} {shape}: {m}")
        export = ["masks=drop"] if op == "msg" else []  # msg's masks are at 0: the export is the model before growth
        assert main(["export-hf", f"ckpt={tmp / op}", f"out={tmp / (op + '_hf')}", *export]) == 0, op
        got = hf_logits(tmp / (op + "_hf"), TOKENS)
        worst = max(worst, (got - want).abs().max().item())
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=lambda m: f"{op} {shape}: {m}")
    print(f"max |logit diff| over msg, zero, clone for {shape}: {worst:.3g}")


def test_a_checkpoint_sharded_by_tensor_grows_as_the_single_file_one(imported, tmp_path, capsys):
    """A run's checkpoint written by several ranks (files model-0000i-of-0000n): expand reads
    every shard (it used to read model.safetensors only, and grew an all-random model)."""
    from orchestrator.checkpoint.canonical import shard_name

    state, _, meta = load_checkpoint(imported[2])
    names = list(state)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]

    def files(tmp):
        for i, part in enumerate(halves):
            write_safetensors_stream(tmp / shard_name("model", i, 2),
                                     [(k, state[k].dtype, tuple(state[k].shape)) for k in part],
                                     ((k, state[k]) for k in part))
            write_safetensors_stream(tmp / shard_name("optimizer", i, 2), [], iter(()))
    write_checkpoint_dir(tmp_path / "sharded", files, {k: v for k, v in meta.items() if k != "format"})
    for src, out in ((imported[2], "one"), (tmp_path / "sharded", "two")):
        assert grow(capsys, "expand", f"ckpt={src}", f"out={tmp_path / out}", "growth=zero", "hidden=48")[0] == 0
    one, two = (tmp_path / d / "model.safetensors" for d in ("one", "two"))
    assert one.read_bytes() == two.read_bytes()


def test_a_checkpoint_whose_tensors_do_not_match_its_spec_is_refused(imported, tmp_path, capsys):
    """A missing tensor would otherwise be grown as a new one (random) without a word."""
    state, _, meta = load_checkpoint(imported[2])
    meta["spec"]["tie_embeddings"] = False  # now head.weight is expected, and absent

    def files(tmp):
        write_safetensors_stream(tmp / "model.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in state.items()],
                                 state.items())
        write_safetensors_stream(tmp / "optimizer.safetensors", [], iter(()))
    write_checkpoint_dir(tmp_path / "odd", files, {k: v for k, v in meta.items() if k != "format"})
    for args in (["expand", "growth=zero", "hidden=48"], ["export-hf"]):
        code, _, err = grow(capsys, *args, f"ckpt={tmp_path / 'odd'}", f"out={tmp_path / 'o'}")
        assert code == 2 and "has no tensor head.weight" in err, err
        assert not (tmp_path / "o").exists()
