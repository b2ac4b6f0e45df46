"""jaxppo.runtime: importing jaxppo changes nothing; `configure()` makes the process-wide settings
explicitly, says in one line what it could not set once JAX has started, and train.deterministic asks
for XLA:GPU's deterministic ops before JAX starts or refuses to start with a one-line error."""

import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from jaxppo.config import load_config
from jaxppo.errors import ConfigError
from jaxppo.runtime import DETERMINISTIC_FLAG, flag_enabled, use_deterministic_ops
from jaxppo.train import main
from jaxppo.run.trainer import PPOTrainer


@pytest.mark.parametrize("flags, value", [
    ("", None), ("--xla_force_host_platform_device_count=2", None),
    (f"{DETERMINISTIC_FLAG}", True), (f"{DETERMINISTIC_FLAG}=true", True), (f"{DETERMINISTIC_FLAG}=1", True),
    (f"--a=1 {DETERMINISTIC_FLAG}=false", False), (f"{DETERMINISTIC_FLAG}=0", False),
    (f"{DETERMINISTIC_FLAG}=true {DETERMINISTIC_FLAG}=false", False),      # the last one wins, as in XLA
    (f"{DETERMINISTIC_FLAG}_extra=true", None),
])
def test_flag_value(flags, value):
    assert flag_enabled(flags, DETERMINISTIC_FLAG) is value


def test_a_fresh_process_gets_the_flag_next_to_its_own():
    code = ("import os, jax; from jaxppo.runtime import use_deterministic_ops; use_deterministic_ops(); "
            "print(jax.device_count(), os.environ['XLA_FLAGS'])")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    # XLA accepted the combined flags (an unknown one aborts the process); the user's come first
    count, *flags = out.stdout.split()
    assert count == "2" and flags[0] == "--xla_force_host_platform_device_count=2"
    assert flags[-1] == f"{DETERMINISTIC_FLAG}=true"


def test_too_late_or_contradicted_is_a_config_error(monkeypatch):
    jnp.zeros(1).block_until_ready()                              # this process's backends have started
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    with pytest.raises(ConfigError, match=f"already started.*XLA_FLAGS={DETERMINISTIC_FLAG}=true") as e:
        use_deterministic_ops()
    assert e.value.keys == ("train.deterministic",) and "\n" not in str(e.value)
    assert "XLA_FLAGS" not in os.environ                          # nothing half-set
    monkeypatch.setenv("XLA_FLAGS", f"{DETERMINISTIC_FLAG}=false")
    with pytest.raises(ConfigError, match="sets --xla_gpu_deterministic_ops=false"):
        use_deterministic_ops()
    monkeypatch.setenv("XLA_FLAGS", f"{DETERMINISTIC_FLAG}=true")  # set by the user before start: fine
    use_deterministic_ops()
    assert os.environ["XLA_FLAGS"] == f"{DETERMINISTIC_FLAG}=true"


def test_the_trainer_and_the_cli_ask_for_it_before_loading_anything(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="train.deterministic=true needs XLA flags"):
        PPOTrainer(load_config(None, [f"train.output_dir={out}", "train.deterministic=true"]))
    assert main([f"train.output_dir={out}", "train.deterministic=true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train.deterministic=true needs XLA flags") and err.count("\n") == 1
    assert not out.exists()


def _python(code: str, **env) -> subprocess.CompletedProcess:
    env = {k: v for k, v in {**os.environ, "JAX_PLATFORMS": "cpu", **env}.items() if v is not None}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_importing_jaxppo_changes_no_environment_variable_or_jax_setting():
    code = ("import os, signal; f = os.environ.get('XLA_FLAGS'); env = dict(os.environ); "
            "h = signal.getsignal(signal.SIGTERM); "
            "import jaxppo, jaxppo.core.gae, jaxppo.train, jaxppo.run.trainer, jaxppo.engine.programs, jaxppo.runtime; "
            "assert os.environ.get('XLA_FLAGS') == f and dict(os.environ) == env, os.environ.get('XLA_FLAGS'); "
            "assert signal.getsignal(signal.SIGTERM) == h; "
            "import jax; assert jax.config.jax_compilation_cache_dir is None; print(jax.device_count())")
    out = _python(code, XLA_FLAGS=None, TRANSFORMERS_VERBOSITY=None)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1"]                 # XLA's own default: nothing asked for two devices


def test_configure_asks_for_two_host_devices_and_the_users_flags_win():
    code = ("import os, jax, jaxppo.runtime as r; notes = r.configure(compilation_cache=False); "
            "print(jax.device_count(), len(notes), os.environ['XLA_FLAGS'])")
    out = _python(code, XLA_FLAGS=None)
    assert out.returncode == 0, out.stderr
    count, notes, *flags = out.stdout.split()
    assert count == ("2" if (os.cpu_count() or 1) >= 2 else "1") and notes == "0"
    assert "--xla_cpu_experimental_ynn_fusion_type=" in flags
    out = _python(code, XLA_FLAGS="--xla_force_host_platform_device_count=3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "3" and out.stdout.count("device_count") == 1


def test_configure_after_jax_started_says_so_in_one_line_and_carries_on():
    code = ("import jax.numpy as jnp, jax; jnp.zeros(1).block_until_ready(); "
            "import jaxppo.runtime as r; notes = r.configure(compilation_cache=False); print(jax.device_count())")
    out = _python(code, XLA_FLAGS=None)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1"]
    lines = [l for l in out.stderr.splitlines() if "jaxppo.runtime.configure" in l]
    assert len(lines) == 1 and "already started" in lines[0] and "could not be set" in lines[0]
