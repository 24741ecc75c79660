import pytest

from splitveil import config_from_dict, load_config
from splitveil.cli import main
from splitveil.defenses import build_defenses
from splitveil.params import ConfigError


def test_overrides_reach_every_section(tmp_path):
    cfg = load_config("configs/quickstart.yaml", ["defense.name=gaussian_noise", "defense.sigma=0.05",
                                                   "train.epochs=3", "model.cut=conv3", "attacks.inverse_network.lr=0.01"])
    assert cfg.train.epochs == 3 and cfg.model.cut == "conv3"
    assert cfg.attack_params()["inverse_network"].lr == 0.01
    stack = build_defenses(cfg.defense)
    assert stack.label == "gaussian_noise" and stack.get("gaussian_noise").params.sigma == 0.05


@pytest.mark.parametrize("override, field", [
    ("train.epoch=3", "train.epoch"),                      # unknown field
    ("train.epochs=three", "train.epochs"),                # bad type
    ("train.optimizer=rmsprop", "train.optimizer"),        # not one of the choices
    ("train.lr=-1", "lr"),                                 # out of range
    ("data.name=nope", "name"),
    ("defense.sigma=0.1", "defense.sigma"),                # no listed defense takes sigma ('none')
    ("defense.name=foo", "defense.name"),
    ("attacks.nope.epochs=1", "attacks.nope"),
    ("attacks.inverse_network.epochs=0", "attacks.inverse_network"),
    ("bogus=1", "bogus"),
    ("train.lr=inf", "train.lr"),                          # not finite
    ("train.lr=.inf", "train.lr"),
    ("train.lr=[1,", "train.lr"),                          # malformed YAML is not read as a string
    ("train..lr=1", "train..lr"),                          # empty part of a dotted name
    ("train.lr.=1", "train.lr."),
])
def test_bad_field_or_value_names_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config("configs/quickstart.yaml", [override])
    assert field in str(e.value)


def test_non_finite_defense_parameter_is_rejected():
    with pytest.raises(ConfigError, match="sigma"):
        build_defenses({"name": "gaussian_noise", "sigma": float("inf")})


def test_defense_composition_and_scoped_params():
    s = build_defenses({"name": ["gaussian_noise"], "gaussian_noise": {"sigma": 0.3}})
    assert s.get("gaussian_noise").params.sigma == 0.3
    with pytest.raises(ConfigError, match="listed twice"):
        build_defenses({"name": "gaussian_noise+gaussian_noise"})
    with pytest.raises(ConfigError, match="sigma"):
        build_defenses({"name": "gaussian_noise", "sigma": -1})


def test_run_id_is_stable_and_config_sensitive():
    a = config_from_dict({"name": "x"}, ["train.epochs=2"])
    b = config_from_dict({"name": "x"}, ["train.epochs=2", "progress=false"])
    c = config_from_dict({"name": "x"}, ["train.epochs=3"])
    assert a.run_id() == b.run_id() != c.run_id()
    # defaults written out or left implicit resolve to the same run
    from splitveil.attacks.inverse_network import InverseNetworkParams
    default_epochs = InverseNetworkParams().epochs   # the current default, written out
    d = config_from_dict({"name": "x"}, ["train.epochs=2", f"attacks.inverse_network.epochs={default_epochs}",
                                         "defense.name=gaussian_noise"])
    e = config_from_dict({"name": "x"}, ["train.epochs=2", "defense.name=gaussian_noise", "defense.sigma=0.1"])
    assert d.run_id() == e.run_id() != a.run_id()
    f = config_from_dict({"name": "x"}, ["train.epochs=2", f"attacks.inverse_network.epochs={default_epochs + 1}",
                                         "defense.name=gaussian_noise"])
    assert f.run_id() != e.run_id()   # a non-default attack budget is a different run


def test_cli_reports_config_errors(capsys):
    assert main(["run", "configs/quickstart.yaml", "--set", "train.epoch=3"]) == 2
    assert "train.epoch" in capsys.readouterr().err
    assert main(["run", "no/such/config.yaml"]) == 2


def test_cli_list_and_blocks(capsys):
    assert main(["list", "defenses"]) == 0
    out = capsys.readouterr().out
    assert "gaussian_noise" in out and "none" in out
    assert main(["list", "models"]) == 0
    assert "vgg11_bn" in capsys.readouterr().out
    assert main(["blocks", "vgg11_bn", "--input", "3,32,32"]) == 0
    out = capsys.readouterr().out
    assert "| 2 | conv2 | (128, 8, 8) | 32,768 |" in out


def test_thread_policy_default_one_explicit_and_auto_under_load():
    """threads: null -> 1 (never slower than one thread on a busy machine, and independent of the load);
    N -> N; auto -> the idle cores, so with every core kept busy by other processes it is 1."""
    import os
    import subprocess
    import sys

    from splitveil.experiments.config import idle_cores, resolve_threads, usable_cores

    assert resolve_threads(None) == 1 and resolve_threads(3) == 3
    assert 1 <= idle_cores() <= min(8, usable_cores())
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        import time
        time.sleep(0.5)
        assert resolve_threads("auto") == 1
    finally:
        for h in hogs:
            h.kill()
            h.wait()
