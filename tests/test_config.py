import sys
from pathlib import Path

import pytest

from dreamprm.config import (
    DEMO_DIR,
    Config,
    ConfigError,
    Source,
    apply_yaml,
    build_parser,
    load_config,
    markdown_reference,
    parse_config,
    parse_sources,
    run_sources,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]


def test_no_config_runs_the_demo_recipe():
    cfg, notes = load_config([])
    assert "demo" in notes[0]
    assert cfg.model.name_or_path == "" and cfg.data.train_file == ""


def test_seed_script_flags_are_aliases_with_the_same_meaning(tmp_path):
    train, meta = tmp_path / "t.jsonl", tmp_path / "m.jsonl"
    train.write_text("{}\n")
    meta.write_text("{}\n")
    model = tmp_path / "model"
    model.mkdir()
    cfg, _ = load_config([
        "--train_json_file", str(train), "--meta_json_file", str(meta), "--model_name", str(model),
        "--weights_path", str(tmp_path / "out"), "--total_steps", "7", "--batch_size", "2",
        "--meta_batch_size", "3", "--lr", "1e-4", "--meta_lr", "0.5", "--lora_r", "4", "--lora_alpha", "8",
        "--lora_dropout", "0.1", "--max_length", "128", "--precision", "fp32", "--seed", "3",
        "--num_workers", "0", "--project_name", "p", "--experiment_name", "e", "--disable_wandb",
        "--resume_from", "none", "--dry_run", "--debug", "--baseline"])
    assert (cfg.data.train_file, cfg.data.meta_file, cfg.model.name_or_path) == (str(train), str(meta), str(model))
    assert cfg.run.output_dir == str(tmp_path / "out")
    assert (cfg.train.total_steps, cfg.train.batch_size, cfg.meta.meta_batch_size) == (7, 2, 3)
    assert (cfg.train.lr, cfg.meta.meta_lr, cfg.model.lora_r, cfg.model.lora_alpha) == (1e-4, 0.5, 4, 8)
    assert cfg.run.disable_wandb and cfg.run.dry_run and cfg.run.debug and cfg.meta.baseline


def test_meta_batch_size_defaults_to_the_training_micro_batch(tmp_path):
    (tmp_path / "t.jsonl").write_text("{}\n")
    (tmp_path / "w.jsonl").write_text("{}\n")
    data = ["--train_file", str(tmp_path / "t.jsonl"), "--meta_file", str(tmp_path / "t.jsonl")]
    cfg, _ = load_config(data + ["--batch_size", "6"])
    assert cfg.meta.meta_batch_size == 6  # resolved, so config.yaml and the resume check see the number
    cfg, _ = load_config(data + ["--batch_size", "6", "--meta_batch_size", "2"])
    assert cfg.meta.meta_batch_size == 2
    cfg, _ = load_config(["--train_file", str(tmp_path / "t.jsonl"), "--batch_size", "6", "--baseline"])
    assert cfg.meta.meta_batch_size == 0  # no meta pass: nothing to resolve
    # --weights_from refuses meta-pass options that are not the default; the default itself is not one
    cfg, _ = load_config(["--train_file", str(tmp_path / "t.jsonl"), "--batch_size", "6",
                          "--weights_from", str(tmp_path / "w.jsonl")])
    assert cfg.meta.meta_batch_size == 0
    with pytest.raises(ConfigError, match="--meta_batch_size 2 is a meta-pass option"):
        load_config(["--train_file", str(tmp_path / "t.jsonl"), "--meta_batch_size", "2",
                     "--weights_from", str(tmp_path / "w.jsonl")])


def test_sources_repeat_as_flags_and_list_in_yaml(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("{}\n")
    b.write_text("{}\n")
    cfg, _ = load_config(["--train_file", str(a), "--baseline"])
    assert cfg.data.train_file == str(a)  # one source: a plain string, as before
    cfg, _ = load_config(["--train_file", f"{a},domain=x", "--train_file", f"{b},weight=2", "--baseline"])
    assert cfg.data.train_file == [f"{a},domain=x", f"{b},weight=2"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  train_file:\n    - {a}\n    - path: {b}\n      weight: 3\n  meta_file: [{a}]\n")
    cfg, _ = load_config(["--config", str(recipe)])
    assert cfg.data.train_file == [str(a), {"path": str(b), "weight": 3}] and cfg.data.meta_file == str(a)
    recipe.write_text("data:\n  train_file: [1, 2]\n")
    with pytest.raises(ConfigError, match="train_file"):
        load_config(["--config", str(recipe)])


def test_new_options_are_validated_naming_the_flag():
    cfg = Config()
    cfg.data.mix, cfg.data.num_workers, cfg.data.mix_alpha = "learned", 2, float("nan")
    cfg.data.curriculum_start, cfg.data.prompt_template = 0.0, "no question here"
    cfg.train.pos_fraction, cfg.train.focal_gamma = 1.0, -1.0
    text = "\n".join(validate(cfg))
    for flag in ("--mix learned: samples", "--mix learned: the sampling", "--mix_alpha", "--curriculum_start",
                 "--prompt_template", "--pos_fraction", "--focal_gamma"):
        assert flag in text, flag


def test_help_lists_every_option():
    text = build_parser().format_help()
    for sec in ("data", "model", "train", "meta", "run"):
        for name in getattr(Config(), sec).__dataclass_fields__:
            assert f"--{name}" in text


def test_yaml_errors_name_file_and_line(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("train:\n  lr: 0.1\n  batchsize: 3\nmodle:\n  mode: lora\nmeta:\n  meta_lr: fast\n")
    cfg, problems = Config(), []
    apply_yaml(cfg, y, problems)
    assert any(f"{y}:3" in p and "train.batchsize" in p for p in problems)
    assert any(f"{y}:4" in p and "modle" in p for p in problems)
    assert any(f"{y}:7" in p and "meta.meta_lr" in p for p in problems)
    assert cfg.train.lr == 0.1


def test_finite_differences_in_bf16_full_finetune_is_rejected():
    cfg = Config()
    cfg.model.mode, cfg.train.precision, cfg.meta.hypergrad = "full", "bf16", "finite_diff"
    assert any("--hypergrad" in p for p in validate(cfg))
    cfg.meta.hypergrad = "exact"
    assert not any("--hypergrad" in p for p in validate(cfg))


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")) + [ROOT / "dreamprm/demo/demo.yaml"],
                         ids=lambda p: p.name)
def test_shipped_recipes_parse(recipe):
    cfg, problems = Config(), []
    apply_yaml(cfg, recipe, problems)
    assert problems == []
    # only the paths a user must supply (or ../shared/realdata) may be invalid
    left = [p for p in validate(cfg)
            if not p.startswith(("--train_file", "--meta_file", "--eval_file", "--model_name"))]
    assert left == []


def test_readme_config_reference_matches_the_code():
    assert markdown_reference() in (ROOT / "README.md").read_text()


def test_source_specs_parse_with_defaults_and_every_problem_named():
    srcs, problems = parse_sources(["a/x.jsonl", "b/y.json,format=processbench,weight=2.5,profile=plain"],
                                   "--train_file", "auto")
    assert problems == []
    assert [(s.name, s.format, s.domain, s.weight, s.profile) for s in srcs] == [
        ("x", "auto", "x", 1.0, None), ("y", "processbench", "y", 2.5, "plain")]
    one, _ = parse_sources("a/x.jsonl", "--train_file", "auto")
    assert one[0].domain is None  # a single source keeps the records' own domain field, as before
    ymap, _ = parse_sources([{"path": "p.jsonl", "domain": "math", "weight": 0}], "--meta_file", "auto")
    assert (ymap[0].domain, ymap[0].weight) == ("math", 0.0)
    _, problems = parse_sources(["a.jsonl,weight=-1", "b.jsonl,weight=nan", "c.jsonl,colour=red",
                                 "d.jsonl,weight", "e/a.jsonl"], "--train_file", "auto")
    text = "\n".join(problems)
    for want in ("a.jsonl: weight=-1", "b.jsonl: weight=nan", "unknown source key(s) ['colour']",
                 "'weight' is not key=value", "several sources are named ['a']"):
        assert want in text, want
    assert all(p.startswith("--train_file") for p in problems)


def test_config_is_a_leaf():
    """config.py imports the standard library, yaml and dreamprm.errors only (not even inside functions):
    every module may import its constants without a circle."""
    import ast

    tree = ast.parse((ROOT / "dreamprm/config.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    ours = {n for n in names if n.startswith("dreamprm")}
    assert ours == {"dreamprm.errors"}
    assert all(n.split(".")[0] in sys.stdlib_module_names or n == "yaml" for n in names - ours), names


def test_the_config_alone_looks_at_no_file_or_folder(tmp_path):
    cfg, problems, notes = parse_config(["--train_file", str(tmp_path / "no.jsonl"), "--meta_file", "no.jsonl",
                                         "--model_name", "/no/such/model", "--deepspeed", "/no/ds.json",
                                         "--resume_from", "/no/ckpt", "--max_length", "9999"])
    assert problems == [] and notes == []
    assert cfg.data.max_length == 9999  # the model's limit is the pre-flight's
    with pytest.raises(ConfigError, match="--lr: must be > 0"):
        load_config(["--lr", "0"])


@pytest.mark.parametrize("flag,value,says", [
    ("max_length", 0, "must be >= 1 (got 0)"), ("num_workers", -1, "must be >= 0 (got -1)"),
    ("lora_alpha", 0, "must be > 0 (got 0)"), ("lora_dropout", 1.0, "must be in [0, 1) (got 1.0)"),
    ("curriculum_start", 0.0, "must be in (0, 1] (got 0.0)"),
    ("lr", float("nan"), "must be a finite number > 0 (got nan)"),
    ("mix_alpha", float("inf"), "must be a finite number >= 0 (got inf)"),
    ("collective_timeout", 0, "must be >= 1 (got 0)"),
    ("resume_step", -1, "must be >= 0 (got -1)"), ("eval_every", -1, "must be >= 0 (got -1)")])
def test_bounds_declared_on_the_fields_are_checked_naming_the_flag(flag, value, says):
    cfg = Config()
    sec = next(s for s in ("data", "model", "train", "meta", "run") if hasattr(getattr(cfg, s), flag))
    setattr(getattr(cfg, sec), flag, value)
    assert [p for p in validate(cfg) if p.startswith(f"--{flag}: must")] == [f"--{flag}: {says}"]


def test_every_bound_is_in_the_reference_table():
    cfg = Config()
    assert validate(cfg) == []
    text = markdown_reference()
    for row in ("| `--lora_dropout` | `model.lora_dropout` | `0.05` | LoRA dropout (off during meta passes) "
                "(in [0, 1)) |", "(a finite number >= 0) |", "`--keep_last` | `run.keep_last` | `3`"):
        assert row in text, row


def test_to_yaml_loads_back_as_the_same_config(tmp_path):
    cfg = Config()
    cfg.train.lr, cfg.data.train_file, cfg.run.resume_step = 1e-3, ["a.jsonl,weight=2", "b.jsonl"], 7
    cfg.meta.baseline = True
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    again, problems = Config(), []
    apply_yaml(again, path, problems)
    assert problems == [] and again == cfg


def test_run_sources_are_the_demo_files_without_a_train_file():
    train, meta = run_sources(Config())
    assert [(s.flag, s.path, s.format) for s in train + meta] == [
        ("--train_file", str(DEMO_DIR / "train.jsonl"), "minif2f"), ("--meta_file", str(DEMO_DIR / "meta.jsonl"),
                                                                       "minif2f")]
    assert all(Path(s.path).is_file() for s in train + meta)
    cfg = Config()
    cfg.data.train_file, cfg.data.meta_file = ["x.jsonl,name=a", "y.jsonl"], "m.jsonl"
    train, meta = run_sources(cfg)
    assert [s.name for s in train] == ["a", "y"] and isinstance(meta[0], Source) and meta[0].domain is None
    cfg.data.train_file = "x.jsonl,bogus=1"
    with pytest.raises(ConfigError, match="unknown source key"):
        run_sources(cfg)


def test_argument_errors_are_one_line_with_a_pointer_to_help_and_abbreviations_are_refused(capsys, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for argv, what in ((["--total_step", "3"], "unrecognized arguments: --total_step 3"),
                       (["--mode", "nope"], "argument --mode: invalid choice: 'nope'"),
                       (["--lr", "abc"], "argument --lr: invalid float value: 'abc'")):
        with pytest.raises(SystemExit) as e:
            parse_config(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert what in err and "see `launch/train.py --help`" in err
    monkeypatch.setenv("LOCAL_RANK", "1")  # another rank of a launcher: rank 0 of the machine says it
    with pytest.raises(SystemExit):
        parse_config(["--total_step", "3"])
    assert capsys.readouterr().err == ""


def test_format_names_are_validated_with_every_other_option(tmp_path, capsys):
    from dreamprm.config import FORMAT_CHOICES, READER_FORMATS
    from dreamprm.data.readers import FORMATS

    assert tuple(FORMATS) == READER_FORMATS  # the one list of names, each with its reader
    for flag in ("--train_format", "--meta_format", "--eval_format"):
        with pytest.raises(SystemExit):
            parse_config([flag, "procesbench"])
        assert f"argument {flag}: invalid choice: 'procesbench'" in capsys.readouterr().err
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  meta_format: procesbench\n")
    _, problems, _ = parse_config(["--config", str(recipe)])
    assert problems == [f"--meta_format: 'procesbench' is not one of {', '.join(FORMAT_CHOICES)}"]
    _, problems, _ = parse_config(["--train_file", "a.jsonl,format=procesbench", "--baseline"])
    assert problems == [f"--train_file a.jsonl: format='procesbench' is not one of {', '.join(FORMAT_CHOICES)}"]


def test_epochs_or_total_steps_one_place_one_of_them(tmp_path):
    _, problems, _ = parse_config(["--epochs", "1", "--total_steps", "3"])
    assert problems == ["--epochs 1: --total_steps sets total_steps too; give one of the two (--epochs computes "
                        "total_steps from the training data)"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  total_steps: 50\n  epochs: 2\n")
    _, problems, _ = parse_config(["--config", str(recipe)])
    assert problems and problems[0].startswith(f"--epochs 2: {recipe}:2 sets total_steps too")
    recipe.write_text("train:\n  total_steps: 50\n")
    cfg, problems, notes = parse_config(["--config", str(recipe), "--epochs", "1.5"])
    assert problems == [] and cfg.train.epochs == 1.5 and f"--epochs 1.5 replaces total_steps of {recipe}:2" in notes
    recipe.write_text("train:\n  epochs: 2\n")
    cfg, problems, notes = parse_config(["--config", str(recipe), "--total_steps", "7"])
    assert problems == [] and (cfg.train.epochs, cfg.train.total_steps) == (0, 7)
    assert f"--total_steps 7 replaces epochs of {recipe}:2" in notes
    assert "--epochs: must be a finite number >= 0 (got -1.0)" in parse_config(["--epochs", "-1"])[1]


def test_warmup_at_least_total_steps_is_a_warning():
    cfg, problems, notes = parse_config(["--warmup_steps", "100", "--total_steps", "3", "--lr", "4e-5"])
    assert problems == []
    assert ("warning: --warmup_steps 100 >= --total_steps 3: the learning rate never reaches --lr 4e-05 (it ends "
            "at 1.2e-06); lower --warmup_steps") in notes
    assert not [n for n in parse_config(["--warmup_steps", "2", "--total_steps", "3"])[2] if "warmup" in n]


def test_a_newline_step_tag_is_refused_with_the_real_reason():
    _, problems, _ = parse_config(["--step_tag", "\n"])
    assert len(problems) == 1 and "contains a newline" in problems[0] and "not one token" not in problems[0]
    assert "steps keep them" in problems[0] and "--train_format trl" in problems[0]
    assert "is blank" in parse_config(["--step_tag", " "])[1][0]


@pytest.mark.parametrize("flag,value", [("--grad_clip", "nan"), ("--lr", "inf"), ("--meta_lr", "nan"),
                                        ("--pos_fraction", "nan"), ("--fd_radius", "inf"),
                                        ("--weight_decay=-inf", None), ("--lora_dropout", "nan")])
def test_nan_or_inf_in_any_float_option_is_refused_naming_the_flag(flag, value):
    with pytest.raises(ConfigError, match=f"{flag.split('=')[0]}: must be a finite number.* \\(got"):
        load_config([flag] + ([value] if value else []))


@pytest.mark.parametrize("argv,says", [(["--seed", "-1"], "--seed: must be in [0, 4294967295]"),
                                       (["--output_dir", ""], "--output_dir: must not be empty"),
                                       (["--output_dir", "  "], "--output_dir: must not be empty")])
def test_a_negative_seed_and_an_empty_output_dir_are_refused(argv, says):
    with pytest.raises(ConfigError) as e:
        load_config(argv)
    assert says in str(e.value)


def test_yaml_faults_get_one_message_naming_file_and_line(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("run:\n  project_name: caf\xe9\n".encode("latin-1"))
    _, problems, _ = parse_config(["--config", str(latin1)])
    assert len(problems) == 1 and f"{latin1}: not UTF-8 text (byte 24" in problems[0]
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  lr: 1.0e-3\n  lr: 2.0e-3\nmeta:\n  meta_lr: 0.1\nmeta:\n  meta_lr: 0.2\n")
    _, problems, _ = parse_config(["--config", str(dup)])
    assert f"{dup}:3: train.lr is given twice (also at line 2); keep one" in problems
    assert f"{dup}:6: meta is given twice (also at line 4); keep one" in problems
    _, problems, _ = parse_config(["--config", str(tmp_path)])
    assert problems == [f"--config: {tmp_path} is a directory; pass a YAML recipe file (e.g. recipes/minif2f.yaml)"]


@pytest.mark.parametrize("text,says", [
    ("run:\n  seed: 7\ntrain:\n  batch_size: " + "9" * 5000 + "\n",
     ":4: an integer has more than 4300 digits (Python's limit for reading integers); write it as a float or a string"),
    ("train:\n  lr_schedule: " + "[" * 3000 + "]" * 3000 + "\n",
     ": cannot read YAML: nested too deeply (PyYAML stops at a few hundred levels)"),
    ("run:\n  experiment_name: 2020-13-45\n", ": cannot read YAML: month must be in 1..12")],
    ids=["digits", "deep", "bad date"])
def test_yaml_values_python_cannot_read_get_one_message_naming_the_file(tmp_path, text, says):
    """PyYAML's int() and datetime() raise ValueError, its composer RecursionError: no traceback."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    _, problems, _ = parse_config(["--config", str(recipe)])
    assert len(problems) == 1 and problems[0].startswith(str(recipe) + says), problems


def test_yaml_1e_minus_4_is_read_as_the_number_it_means(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 1e-4\nmeta:\n  meta_lr: 5E-2\n  fd_radius: 'small'\n")
    cfg, problems, _ = parse_config(["--config", str(recipe)])
    assert (cfg.train.lr, cfg.meta.meta_lr) == (1e-4, 5e-2)
    assert problems == [f"{recipe}:5: meta.fd_radius: 'small' is not a float (write a number, e.g. 1.0e-4; "
                        "not quoted)"]


def test_weights_from_refuses_every_bilevel_option_naming_both_flags():
    base = ["--train_file", "t.jsonl", "--weights_from", "runs/proxy"]
    assert parse_config(base)[1] == []  # no meta file needed: no meta pass
    cases = {("--baseline",): "--baseline", ("--meta_file", "m.jsonl"): "--meta_file",
             ("--hypergrad", "fused"): "--hypergrad fused", ("--meta_lr", "0.5"): "--meta_lr 0.5",
             ("--weights", "domain_table"): "--weights domain_table",
             ("--mix", "learned", "--train_file", "u.jsonl"): "--mix learned"}
    for extra, says in cases.items():
        problems = parse_config(base + list(extra))[1]
        assert len(problems) == 1, (extra, problems)
        assert problems[0].startswith("--weights_from runs/proxy: trains with fixed weights") and says in problems[0]
    _, problems, _ = parse_config(["--train_file", "t.jsonl", "--meta_file", "m.jsonl", "--unmatched_weight", "one"])
    assert problems == ["--unmatched_weight one: applies only with --weights_from RUN_DIR; drop it"]
