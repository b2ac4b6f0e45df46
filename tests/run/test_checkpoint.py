"""jaxppo.run.checkpoint: leaf-by-leaf round trip, retention, crash safety, compatibility errors."""

import functools
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, struct

from jaxppo.run.checkpoint import Checkpointer, CheckpointError, find_checkpoint_dir
from jaxppo.errors import JaxppoError

REPO = Path(__file__).resolve().parents[2]
TMP_SUFFIX = ".orbax-checkpoint-tmp"   # orbax's name for a step that is still being written


class MLP(nnx.Module):
    def __init__(self, sizes, rngs, param_dtype=jnp.float32):
        self.hidden = nnx.Linear(sizes[0], sizes[1], param_dtype=param_dtype, rngs=rngs)
        self.out = nnx.Linear(sizes[1], sizes[2], param_dtype=param_dtype, rngs=rngs)


@struct.dataclass
class TrainState:
    policy: Any      # nnx.State of the policy (bfloat16 params)
    critic: Any      # nnx.State of the value model
    opt_state: Any   # chain(clip_by_global_norm, adamw) over {"policy", "critic"}
    plateau: Any     # optax.contrib.reduce_on_plateau state
    rng: jax.Array   # uint32[2]
    step: jax.Array  # int32 []
    kl_coef: jax.Array  # float32 []


@functools.partial(jax.jit, static_argnums=0)  # eager, the ~150 small ops compile one by one
def make_state(hidden=7, seed=0):
    """Two small models and their optimizer states after two updates, as a `TrainState`."""
    rngs = nnx.Rngs(seed)
    policy = nnx.state(MLP((5, hidden, 11), rngs, param_dtype=jnp.bfloat16), nnx.Param)
    critic = nnx.state(MLP((5, hidden, 1), rngs), nnx.Param)
    params, key = {"policy": policy, "critic": critic}, jax.random.PRNGKey(seed + 100)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
    plateau_tx = optax.contrib.reduce_on_plateau(patience=1)
    opt_state, plateau = tx.init(params), plateau_tx.init(params)
    for i in range(2):
        key, sub = jax.random.split(key)
        leaves, treedef = jax.tree.flatten(params)
        noise = jax.random.normal(sub, (len(leaves),))
        grads = jax.tree.unflatten(treedef, [jnp.full_like(x, n) for x, n in zip(leaves, noise)])
        upd, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, upd)
        _, plateau = plateau_tx.update(upd, plateau, value=jnp.float32(2.0 - 0.25 * i))
    return TrainState(policy=params["policy"], critic=params["critic"], opt_state=opt_state,
                      plateau=plateau, rng=jax.random.PRNGKey(3), step=jnp.int32(2),
                      kl_coef=jnp.float32(0.05))


HOST = {"iterator": {"epoch": 1, "position": 17, "seed": 0},
        "early_stopping": {"best": 0.25, "bad_count": 1, "stopped": False, "reason": None},
        "fingerprint": {"policy_hidden": 7}}


def assert_same_tree(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        name = jax.tree_util.keystr(path)
        assert isinstance(a, jax.Array), name
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


@pytest.fixture(scope="module")
def state():
    return make_state()


def test_small_leaves_packed_big_ones_alone(tmp_path, state):
    """A few arrays per checkpoint (orbax's cost is per array); big leaves are never copied to pack."""
    import json

    with Checkpointer(tmp_path, pack_max_elements=40) as ck:
        ck.save(2, state, HOST)
        ck.wait()
        layout = json.loads((tmp_path / "2" / "layout" / "metadata").read_text())["leaves"]
        restored, _ = ck.restore(2, jax.eval_shape(lambda: state))
    assert_same_tree(restored, state)
    big = {e["name"] for e in layout if "group" not in e}
    sizes = {e["name"]: int(np.prod(e["shape"])) for e in layout}
    assert big == {n for n, size in sizes.items() if size > 40} and big
    assert "policy.out.kernel.value" in big and "policy.hidden.kernel.value" not in big   # 7 x 11 vs 5 x 7
    groups = {e["group"] for e in layout if "group" in e}
    assert groups == {"bfloat16", "float32", "int32", "uint32"}
    # one packed array per dtype, offsets back to back
    for g in groups:
        entries = [e for e in layout if e.get("group") == g]
        assert [e["offset"] for e in entries] == list(np.cumsum([0] + [sizes[e["name"]] for e in entries[:-1]]))


def test_round_trip_leaf_by_leaf(tmp_path, state):
    with Checkpointer(tmp_path / "checkpoints") as ck:
        assert ck.save(2, state, HOST, {"eval/score": 0.5})
        ck.wait()
        assert ck.latest_step() == 2 and ck.all_steps() == [2]
        restored, host = ck.restore(None, jax.eval_shape(lambda: state))
    assert_same_tree(restored, state)
    assert host == HOST
    assert restored.rng.dtype == jnp.uint32 and restored.step.dtype == jnp.int32
    assert type(restored.opt_state[1][0]) is type(state.opt_state[1][0])   # ScaleByAdamState
    assert isinstance(restored.plateau, optax.contrib.ReduceLROnPlateauState)
    assert restored.policy["hidden"]["kernel"][...].dtype == jnp.bfloat16
    # A fresh Checkpointer (a resumed run), restoring into concrete arrays as the target.
    with Checkpointer(tmp_path / "checkpoints") as ck:
        again, host = ck.restore(2, state)
    assert_same_tree(again, state)
    assert host == HOST


def test_back_to_back_saves_keep_their_own_values(tmp_path):
    """Saves reuse one host buffer per dtype (no fresh pages per save) and orbax does not copy it:
    a save started while the previous one may still be writing must not change what that one wrote."""
    states = {s: {"w": jnp.arange(300_000, dtype=jnp.float32) * s, "b": jnp.full((7,), s, jnp.int32)}
              for s in (1, 2, 3)}
    with Checkpointer(tmp_path, keep=4) as ck:
        for s, st in states.items():
            assert ck.save(s, st, {"step": s})          # no wait in between
        buffers = dict(ck._pack_buffers)
        assert ck.save(4, states[3], {"step": 4})
        assert all(ck._pack_buffers[g] is buffers[g] for g in buffers) and set(buffers) == {"float32", "int32"}
        ck.wait()
        for s, st in states.items():
            restored, host = ck.restore(s, st)
            assert_same_tree(restored, st)
            assert host == {"step": s}


def test_reads_checkpoints_written_with_orbax_defaults(tmp_path, state, monkeypatch):
    """Checkpoints written before saves turned compression off (orbax's default handler) still restore."""
    import orbax.checkpoint as ocp

    from jaxppo.run import checkpoint

    monkeypatch.setattr(checkpoint, "state_handler", lambda: ocp.PyTreeCheckpointHandler())
    with Checkpointer(tmp_path) as ck:
        assert ck.save(2, state, HOST, force=True)
    monkeypatch.undo()
    with Checkpointer(tmp_path) as ck:
        restored, host = ck.restore(2, jax.eval_shape(lambda: state))
    assert_same_tree(restored, state)
    assert host == HOST


@pytest.mark.parametrize("mode", ["max", "min"])
def test_retention_keeps_latest_and_best(tmp_path, mode):
    small = {"w": jnp.arange(3.0), "step": jnp.int32(0)}
    score = {1: 0.1, 2: 0.9, 3: 0.2, 4: 0.3, 5: 0.4, 6: 0.5, 7: 0.6}   # step 2 is best for "max"
    if mode == "min":
        score = {k: -v for k, v in score.items()}
    d = tmp_path / "checkpoints"
    with Checkpointer(d, keep=3, best_metric="eval/score", best_mode=mode) as ck:
        for step in range(1, 7):
            assert ck.save(step, small, {"step": step}, {"eval/score": score[step], "other": 1.0})
        ck.wait()
        assert ck.all_steps() == [2, 4, 5, 6]
        assert ck.best_step() == 2
    assert sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) == [2, 4, 5, 6]
    # The best step is remembered across a restart (orbax reads metrics/ back).
    with Checkpointer(d, keep=3, best_metric="eval/score", best_mode=mode) as ck:
        ck.save(7, small, {"step": 7}, {"eval/score": score[7]})
        ck.save(8, small, {"step": 8})                  # no metric: kept only while among the latest
        ck.wait()
        assert ck.all_steps() == [2, 6, 7, 8]


def test_plain_save_skips_old_steps_and_force_waits(tmp_path, state):
    with Checkpointer(tmp_path) as ck:
        assert ck.save(5, state, HOST)
        assert not ck.save(5, state, HOST)             # not newer than the latest
        assert not ck.save(4, state, HOST)
        assert ck.save(4, state, HOST, force=True)     # waits for step 5, then writes 4 and commits
        assert (tmp_path / "4").is_dir() and ck.all_steps() == [4, 5]
        assert not ck.save(5, state, HOST, force=True)  # already there


def test_force_save_from_sigterm_handler_after_async_save(tmp_path, state):
    ck = Checkpointer(tmp_path)
    results = []

    def on_sigterm(signum, frame):
        results.append(ck.save(11, state.replace(step=jnp.int32(11)), HOST, force=True))

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        assert ck.save(10, state, HOST)                # async, probably still writing
        os.kill(os.getpid(), signal.SIGTERM)           # handler runs at the next bytecode
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert results == [True]
    assert (tmp_path / "10").is_dir() and (tmp_path / "11").is_dir()   # both committed on return
    restored, _ = ck.restore(None, jax.eval_shape(lambda: state))
    assert int(restored.step) == 11
    ck.close()


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys, time
    import jax, jax.numpy as jnp
    from jaxppo.run.checkpoint import Checkpointer

    d = sys.argv[1]
    ck = Checkpointer(d)
    ck.save(1, {"w": jnp.arange(10, dtype=jnp.float32), "step": jnp.int32(1)}, {"position": 1})
    ck.wait()
    big = {"w": jax.random.uniform(jax.random.PRNGKey(0), (1 << 24,)), "step": jnp.int32(2)}  # 64 MiB
    ck.save(2, big, {"position": 2})                   # returns while the write goes on
    tmp = os.path.join(d, "2.orbax-checkpoint-tmp")
    deadline = time.time() + 10
    while not os.path.isdir(tmp) and time.time() < deadline:   # directories are made async too
        time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_killed_during_async_save_resumes_from_last_complete(tmp_path):
    d = tmp_path / "checkpoints"
    script = tmp_path / "killed_save.py"
    script.write_text(KILLED_SAVE)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(script), str(d)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (d / "1").is_dir() and (d / f"2{TMP_SUFFIX}").is_dir() and not (d / "2").exists()

    with pytest.warns(RuntimeWarning, match="incomplete checkpoint"):
        ck = Checkpointer(d)
    assert not (d / f"2{TMP_SUFFIX}").exists()         # cleaned up
    assert ck.all_steps() == [1] and ck.latest_step() == 1
    target = {"w": jax.ShapeDtypeStruct((10,), jnp.float32), "step": jax.ShapeDtypeStruct((), jnp.int32)}
    restored, host = ck.restore(None, target)
    np.testing.assert_array_equal(restored["w"], np.arange(10, dtype=np.float32))
    assert int(restored["step"]) == 1 and host == {"position": 1}
    assert ck.save(2, restored, {"position": 2})       # the interrupted step can be written again
    ck.close()
    assert (d / "2").is_dir()


def test_leftover_temporary_dir_is_ignored_and_removed(tmp_path, state):
    with Checkpointer(tmp_path) as ck:
        ck.save(3, state, HOST)
    junk = tmp_path / f"5{TMP_SUFFIX}" / "state"
    junk.mkdir(parents=True)
    (junk / "garbage").write_bytes(b"\0" * 100)
    with pytest.warns(RuntimeWarning, match=f"5{TMP_SUFFIX}"):
        ck = Checkpointer(tmp_path)
    assert ck.latest_step() == 3 and not junk.parent.exists()
    restored, _ = ck.restore(None, jax.eval_shape(lambda: state))
    assert_same_tree(restored, state)
    ck.close()


def test_corrupt_latest_step_falls_back_with_warning(tmp_path, state):
    newer = state.replace(step=jnp.int32(9), kl_coef=jnp.float32(0.5))
    with Checkpointer(tmp_path) as ck:
        ck.save(2, state, HOST)
        ck.save(9, newer, HOST)
    for f in (tmp_path / "9" / "state").rglob("*"):   # e.g. a crash while the step was deleted
        if f.is_file():
            f.write_bytes(b"")
    with Checkpointer(tmp_path) as ck:
        assert ck.latest_step() == 9                   # the folder looks committed ...
        with pytest.warns(RuntimeWarning, match="9.*unreadable.*falling back"):
            restored, host = ck.restore(None, jax.eval_shape(lambda: state))
        assert_same_tree(restored, state)              # ... but step 2 is what comes back
        with pytest.raises(CheckpointError, match="unreadable"):
            ck.restore(9, jax.eval_shape(lambda: state))
        with pytest.raises(CheckpointError, match=r"no checkpoint for step 7 .*\[2, 9\]"):
            ck.restore(7, jax.eval_shape(lambda: state))


def test_incompatible_model_names_the_leaf(tmp_path, state):
    with Checkpointer(tmp_path) as ck:
        ck.save(1, state, HOST)
        wider = jax.eval_shape(lambda: make_state(hidden=8))
        with pytest.raises(CheckpointError) as err:
            ck.restore(None, wider)
        msg = str(err.value)
        assert "\n" not in msg and isinstance(err.value, JaxppoError)
        assert "policy.hidden.bias.value" in msg and "(7,)" in msg and "(8,)" in msg, msg

        extra = jax.eval_shape(lambda: {"params": state, "extra": jnp.zeros(2)})
        with pytest.raises(CheckpointError, match="not in the checkpoint"):
            ck.restore(1, extra)
        with pytest.raises(CheckpointError, match="rng has dtype uint32 in the checkpoint but int32"):
            ck.restore(1, jax.eval_shape(lambda: state.replace(rng=jnp.zeros(2, jnp.int32))))
        fewer = jax.eval_shape(lambda: state.replace(kl_coef=None))
        with pytest.raises(CheckpointError, match="kl_coef is in the checkpoint but not in the model"):
            ck.restore(1, fewer)


def test_find_checkpoint_dir(tmp_path):
    run = tmp_path / "run"
    d = run / "checkpoints"
    with Checkpointer(d) as ck:
        ck.save(40, {"w": jnp.ones(2)}, {})
    assert find_checkpoint_dir(run) == (d, None)
    assert find_checkpoint_dir(d) == (d, None)
    assert find_checkpoint_dir(str(d / "40")) == (d, 40)
    (d / f"50{TMP_SUFFIX}" / "state").mkdir(parents=True)
    for bad in (tmp_path / "missing", tmp_path, d / f"50{TMP_SUFFIX}", d / "40" / "state"):
        with pytest.raises(CheckpointError, match=f"no checkpoint found in {bad}"):
            find_checkpoint_dir(bad)
    with Checkpointer(tmp_path / "empty") as ck:
        with pytest.raises(CheckpointError, match="no checkpoint found"):
            ck.restore(None, {"w": jnp.ones(2)})


def test_typed_key_none_and_empty_nodes_round_trip(tmp_path):
    tree = {"key": jax.random.key(7), "none": None, "empty": optax.EmptyState(), "unit": (),
            "w": jnp.arange(4, dtype=jnp.int8)}
    with Checkpointer(tmp_path) as ck:
        ck.save(1, tree, {})
        restored, _ = ck.restore(1, jax.eval_shape(lambda: tree))
    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    assert restored["key"].dtype == tree["key"].dtype
    np.testing.assert_array_equal(jax.random.key_data(restored["key"]), jax.random.key_data(tree["key"]))
    np.testing.assert_array_equal(restored["w"], tree["w"])
