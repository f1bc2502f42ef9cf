"""selmix_dist.experiments.spec: the experiment files load, every key is documented, bad keys and values are
rejected with the file, key and closest valid name, overrides reach every level."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from selmix_dist.experiments.methods import KINDS, TrainerSettings, trainer_config
from selmix_dist.experiments.spec import SECTIONS, RunSpec, describe, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[2]
CIFAR = REPO / "configs" / "experiments" / "cifar10_lt.yaml"
TINY = REPO / "configs" / "experiments" / "tiny_imagenet_lt.yaml"


def test_cifar_experiment_holds_todays_protocol_and_hyper_parameters():
    spec = load_spec(CIFAR)
    assert (spec.split.n1, spec.split.rho_l, spec.split.m1, spec.split.n_val) == (1500, 100.0, 3000, 500)
    assert spec.features.image_size == 128 and spec.seeds == [0, 1, 2] and spec.rho_u == [100.0, 1.0]
    # 14 methods; plug-in rows: 3 objectives on the LA and FixMatch-LA heads, 2 coverage ones with a start chosen
    # on validation, and 5 SelMix + plug-in rows
    assert len(spec.methods) == 14 + 6 + 2 + 5
    plugins = {n: m.settings for n, m in spec.methods.items() if m.kind == "plugin"}
    assert all(s.objective in n for n, s in plugins.items())
    assert all(set(plugins[f"selmix_plugin_{o}"].start) == {f"selmix_{p}" for p in
               ("min_recall", "h_mean", "g_mean", "mean_recall_min_coverage", "h_mean_min_coverage")}
               for o in ("min_recall", "h_mean", "g_mean"))
    selmix = spec.methods["selmix_min_recall"].settings
    cfg = trainer_config(selmix, spec.trainer)
    assert (cfg.run.steps, cfg.optim.lr, cfg.optim.batch_size) == (3000, 3e-3, 64)
    # the library's temperature rule (docs/defaults.md), not a pinned one
    assert (cfg.selmix.temperature_rule, cfg.selmix.target_support) == ("support", 0.25)
    assert cfg.objective.name == "min_recall" and cfg.objective.active() == {"beta": 0.0, "omega": 50.0}
    assert trainer_config(spec.methods["mixup"].settings, spec.trainer).selmix.uniform is True
    csst = spec.methods["csst_mean_recall_min_coverage"].settings
    assert (csst.lr, csst.steps, csst.params["update"], csst.params["omega"]) == (1e-4, 3000, "dual", 1.0)
    fixmatch = spec.methods["fixmatch_la"].settings
    assert (fixmatch.start, fixmatch.steps, fixmatch.lr) == ("la", 2000, 3e-3)
    # every fine-tuned method starts from the FixMatch-LA analogue (docs/defaults.md: start head)
    for name, m in spec.methods.items():
        if m.kind in ("trainer", "csst"):
            assert m.settings.start == "fixmatch_la", name


def test_tiny_experiment_adds_decoupling_and_min_head_tail():
    spec = load_spec(TINY)
    assert (spec.split.n1, spec.split.rho_l, spec.split.m1, spec.split.n_val) == (300, 100.0, 150, 50)
    cifar = load_spec(CIFAR)
    assert set(cifar.methods) < set(spec.methods)
    extra = {"crt", "tau_norm", "lws", "selmix_min_head_tail_recall", "plugin_la_min_head_tail_recall",
             "plugin_fixmatch_la_min_head_tail_recall", "selmix_plugin_min_head_tail_recall"}
    extra |= {f"plugin_tau_norm_{o}" for o in ("min_recall", "min_head_tail_recall", "h_mean", "g_mean")}
    assert set(spec.methods) - set(cifar.methods) == extra
    assert spec.trainer == cifar.trainer


def test_every_key_and_setting_is_documented():
    classes = [RunSpec, *SECTIONS.values(), *(k.settings for k in KINDS.values())]
    for cls in classes:
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("doc", "")) >= 8, f"{cls.__name__}.{f.name}"
    text = describe()
    assert all(f"[{kind}]" in text for kind in KINDS)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: r.update(seed=[0]), "unknown key 'seed' (did you mean 'seeds'?)"),
    (lambda r: r["split"].update(rho=10), "unknown key 'split.rho' (did you mean 'split.rho_l'?)"),
    (lambda r: r["split"].pop("n1"), "missing key(s) ['split.n1']"),
    (lambda r: r["split"].update(n1="many"), "config key 'split.n1' expects an integer, got 'many'"),
    (lambda r: r.pop("data"), "missing section 'data'"),
    (lambda r: r["methods"]["erm"].update(los="ce"),
     "unknown key 'methods.erm.los' (did you mean 'methods.erm.loss'?)"),
    (lambda r: r["methods"]["erm"].update(kind="fit_heads"),
     "unknown method kind 'fit_heads' (did you mean 'fit_head'?)"),
    (lambda r: r["methods"]["erm"].update(loss="hinge"), "methods.erm: loss must be one of"),
    (lambda r: r["methods"]["st"].update(start="er"),
     "methods.st.start: unknown method 'er' (did you mean 'erm'?)"),
    (lambda r: r["methods"].update(a={"kind": "posthoc", "start": "b"}, b={"kind": "posthoc", "start": "a"}),
     "methods.a: start heads form a loop a → b → a"),
    (lambda r: r["methods"]["st"].update(start=["erm", "tau"]),
     "methods.st.start: unknown method 'tau' (did you mean 'tau_norm'?)"),
    (lambda r: r["methods"].update(a={"kind": "posthoc", "start": ["erm", "b"]}, b={"kind": "posthoc", "start": "a"}),
     "methods.a: start heads form a loop a → b → a"),
    (lambda r: r.update(trainer={"optim.lrr": 0.1}), "trainer: command line: unknown config key 'optim.lrr' "
                                                     "(did you mean 'optim.lr'?)"),
    (lambda r: r["methods"].update(sm={"kind": "trainer", "start": "erm",
                                       "trainer": {"objective.name": "h_mean"}}),
     "methods.sm: trainer key 'objective.name' is set by the runner or the method entry"),
    (lambda r: r["methods"].update(sm={"kind": "trainer", "start": "erm", "objective": "min_recal"}),
     "unknown objective 'min_recal'; did you mean 'min_recall'?"),
    (lambda r: r["methods"].update(sm={"kind": "csst", "start": "erm", "objective": "min_recall",
                                       "params": {"omegaa": 1}}), "has no parameter(s) ['omegaa']"),
    (lambda r: r["methods"].update({"a-b": {"kind": "crt"}}), "method 'a-b': a method name may use"),
])
def test_bad_entries_name_the_file_and_key(toy_raw, edit, message):
    edit(toy_raw)
    with pytest.raises(ValueError) as e:
        parse_spec(toy_raw, "toy.yaml")
    assert str(e.value).startswith("toy.yaml")
    assert message in str(e.value)


def test_overrides_reach_every_level(tmp_path, toy_raw):
    toy_raw["methods"]["sm"] = {"kind": "trainer", "start": "st", "objective": "min_recall"}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(toy_raw, allow_unicode=True))
    spec = load_spec(path, ["split.n1=20", "seeds=[3]", "trainer.run.steps=7", "methods.st.steps=9",
                            "methods.sm.params.omega=20", "methods.sm.trainer.selmix.uniform=true"])
    assert spec.split.n1 == 20 and spec.seeds == [3] and spec.trainer == {"run.steps": 7}
    assert spec.methods["st"].settings.steps == 9
    sm = spec.methods["sm"].settings
    assert isinstance(sm, TrainerSettings) and sm.params == {"omega": 20} and sm.trainer == {"selmix.uniform": True}
    cfg = trainer_config(sm, spec.trainer)
    assert (cfg.run.steps, cfg.selmix.uniform, cfg.objective.active()) == (7, True, {"omega": 20})
    with pytest.raises(ValueError, match="unknown method 'stt' \\(did you mean 'st'\\?\\)"):
        load_spec(path, ["methods.stt.steps=9"])
    with pytest.raises(ValueError, match="not of the form"):
        load_spec(path, ["split.n1"])
