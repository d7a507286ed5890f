"""recipes/: the shell helpers, run with a stand-in `dreamprm` (the recipes' YAML is read by tests/test_readme.py
and tests/test_config.py)."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_realdata_prepare_links_the_cached_smollm2_folder_instead_of_copying_it(tmp_path):
    cache = tmp_path / "cache" / "smollm2-135m-instruct"
    cache.mkdir(parents=True)
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "dreamprm"  # records its arguments; `smollm2` prints the cached folder as the real one does
    stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n[ "$1" = smollm2 ] && echo {cache}\nexit 0\n')
    stub.chmod(0o755)
    work = tmp_path / "checkout"
    work.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DREAMPRM_SHARED": str(tmp_path / "shared")}
    p = subprocess.run(["bash", str(ROOT / "recipes/realdata_prepare.sh"), "512"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    model = work / "models" / "smollm2-135m-instruct"
    assert model.is_symlink() and model.resolve() == cache.resolve()
    lines = calls.read_text().splitlines()
    assert lines[0] == "smollm2"  # no --out: no second copy of the model
    assert all(f"--tokenizer {Path('models/smollm2-135m-instruct')} --max_length 512" in ln for ln in lines[1:])
    assert len(lines) == 6
    # run again: the link is reused; a real folder left by an older version is used as it is
    assert subprocess.run(["bash", str(ROOT / "recipes/realdata_prepare.sh")], cwd=work, env=env,
                          capture_output=True, timeout=60).returncode == 0
    model.unlink()
    model.mkdir()
    p = subprocess.run(["bash", str(ROOT / "recipes/realdata_prepare.sh")], cwd=work, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "using the existing folder" in p.stdout and not model.is_symlink()
