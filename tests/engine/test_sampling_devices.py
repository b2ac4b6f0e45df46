"""Sampling on every device: the rollout's rows split over all host devices, whatever the
placement and mesh, give the tokens one device gives (subprocesses with 1, 2 and 8 devices); with
few rows per CPU device (`MIN_ROWS_PER_HOST_DEVICE`) the first device samples them alone."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import functools, json, sys
    import jax
    import numpy as np
    from flax import nnx
    sys.path.insert(0, sys.argv[1])
    from helpers import left_padded_batch, small_model
    from jaxppo.engine import placement as placement_module
    from jaxppo.engine.mesh import make_meshes, replicated, shard_batch, shard_tree
    from jaxppo.engine.placement import Placement
    from jaxppo.engine.programs import sample_phase
    from jaxppo.engine.sampling import SamplingParams

    n = jax.device_count()
    # (placement, mesh_data, mesh_fsdp, fewest decode rows per CPU device): 1 = always every device
    layouts = [("colocated", 1, -1, 1), ("colocated", -1, 1, 1)]     # FSDP over all devices; data parallel
    if n >= 2:
        layouts += [("separate", 1, -1, 1),                          # policy on the first half, critic on the rest
                    ("colocated", 1, -1, None), ("separate", 1, -1, None)]   # the default: 16 rows on the first
    if n == 8:
        layouts += [("colocated", 2, 4, 1), ("separate", 2, 2, 1)]
    graph, params = nnx.split(small_model(seed=4))
    ids, mask = left_padded_batch(B=8, P=6)
    sampling = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=40, pad_token_id=1, eos_token_ids=(5, 9),
                              num_generations=2)
    program = jax.jit(functools.partial(sample_phase, graph, sampling))   # as make_programs jits it
    results = {}
    default = placement_module.MIN_ROWS_PER_HOST_DEVICE
    for placement, data, fsdp, fewest in layouts:
        placement_module.MIN_ROWS_PER_HOST_DEVICE = fewest or default
        p = Placement(*make_meshes(data, fsdp, placement))
        key = jax.device_put(jax.random.PRNGKey(7), replicated(p.policy_mesh))
        args = p.to_sampler(shard_tree(params, p.policy_mesh), shard_batch(ids, p.policy_mesh),
                            shard_batch(mask, p.policy_mesh), key, generations=2)
        out, attn = p.from_sampler(program(*args))                   # as `rollout` does
        hlo = program.lower(*args).compile().as_text()
        on = lambda x: sorted(d.id for d in x.sharding.device_set)
        results[f"{placement}-{data}x{fsdp}-{fewest}"] = {
            "tokens": np.asarray(out.tokens).tolist(), "logprobs": np.asarray(out.logprobs).tolist(),
            "mask": np.asarray(out.mask).tolist(), "attn": np.asarray(attn).tolist(),
            "num_steps": int(out.num_steps), "sampled_on": on(args[1]), "params_on": on(jax.tree.leaves(args[0])[0]),
            "params_whole": all(x.sharding.is_fully_replicated for x in jax.tree.leaves(args[0])),
            "rows_on": on(out.tokens), "policy_devices": sorted(d.id for d in p.policy_mesh.devices.flat),
            "all_gathers": hlo.count("all-gather-start") + hlo.count("all-gather(")}
    print("RESULT " + json.dumps(results))
""")


def sample_on(device_counts):
    """{n: results} of SCRIPT in one process per device count, the processes running side by side
    (most of each is single-threaded importing and compiling)."""
    procs = {n: subprocess.Popen([sys.executable, "-c", SCRIPT, TESTS], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}"))
             for n in device_counts}
    runs = {}
    for n, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        line = [l for l in stdout.splitlines() if l.startswith("RESULT ")][-1]
        runs[n] = json.loads(line[len("RESULT "):])
    return runs


@pytest.mark.slow
def test_sampling_splits_over_every_device_and_gives_the_same_tokens():
    runs = sample_on((1, 2, 8))
    reference = runs[1]["colocated-1x-1-1"]
    assert 1 < reference["num_steps"] <= 10 and 0 < np.sum(reference["mask"]) < 16 * 10   # some rows stop early
    for n, layouts in runs.items():
        assert len(layouts) == {1: 2, 2: 5, 8: 7}[n]
        for name, r in layouts.items():
            where = f"{n} devices, {name}"
            # every device samples (the 16 rows on the first alone by default on a CPU), each with
            # the whole parameters: no decode step gathers them
            on = [0] if name.endswith("None") else list(range(n))
            assert r["sampled_on"] == on and r["params_on"] == on, where
            assert r["params_whole"] and r["all_gathers"] == 0, where
            assert r["rows_on"] == r["policy_devices"], where            # the rows went back to the policy's mesh
            for k in ("tokens", "mask", "attn", "num_steps"):
                assert r[k] == reference[k], f"{where}: {k}"
            np.testing.assert_allclose(r["logprobs"], reference["logprobs"], rtol=0, atol=1e-6, err_msg=where)
