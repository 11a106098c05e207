import json
from dataclasses import replace

import pytest

from kitspipe.errors import PlanError
from kitspipe.plans import load_plans, load_preset, preset_names, save_plans


def _resolved_paper(tmp_path):
    plans = load_preset("paper")
    plans = replace(plans, intensity=replace(plans.intensity, mean=100.0, std=50.0),
                    loss=replace(plans.loss, high_positive_weights=(3.0, 8.0), low_positive_weight=3.0))
    path = tmp_path / "plans.json"
    save_plans(plans, path)
    return path


def test_presets_load_and_paper_matches_the_paper():
    assert {"paper", "cpu"} <= set(preset_names())
    paper = load_preset("paper")
    assert paper.high.spacing_mm == (1.0, 1.0, 1.0) and paper.low.spacing_mm == (4.0, 4.0, 4.0)
    assert paper.high.input_patch == (108,) * 3 and paper.high.output_patch == (20,) * 3
    assert paper.low.input_patch == (108,) * 3 and paper.low.output_patch == (20,) * 3
    assert (paper.high.base_filters, paper.low.base_filters) == (32, 16)
    assert paper.intensity.clip_hu == (-500.0, 400.0)
    assert paper.training.learning_rate == 1e-4 and paper.training.lr_decay_per_epoch == 0.9
    assert (paper.loss.high_weight, paper.loss.classification_weight, paper.loss.low_weight) == (2.0, 2.0, 1.0)
    assert (paper.loss.dice_weight, paper.loss.ce_weight, paper.loss.topk_fraction) == (0.2, 0.8, 0.7)
    assert paper.training.patience == 10 and paper.training.validation_fraction == 0.2
    assert paper.scale == 4


def test_round_trip_is_identical(tmp_path):
    path = _resolved_paper(tmp_path)
    plans = load_plans(path)
    save_plans(plans, tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["high"].update(target_spacng=[1, 1, 1]), "high.target_spacng: unknown key"),
    (lambda d: d["high"].update(spacing_mm=[1, 0, 1]), "spacing_mm"),
    (lambda d: d["intensity"].update(clip_hu=[400, -500]), "clip_hu"),
    (lambda d: d["training"].update(n_folds=1), "n_folds"),
    (lambda d: d["training"].update(learning_rate="fast"), "training.learning_rate: expected a finite number"),
    (lambda d: d["high"].update(input_patch=[107, 108, 108]), "input_patch"),
    (lambda d: d["low"].update(spacing_mm=[4, 4, 2.5]), "low.spacing_mm"),
    (lambda d: d["network"].update(mask_join="sideways"), "network.mask_join: 'sideways' is not one of"),
    (lambda d: d.pop("high"), ".high: missing required key"),
    (lambda d: d["training"].update(weight_average_decay=1.0), "training: weight_average_decay: must be within"),
    (lambda d: d["network"].update(normalisation="group"), "network.normalisation: 'group' is not one of"),
    (lambda d: d["high"].update(padding="reflect"), "high.padding: 'reflect' is not one of"),
    (lambda d: d["high"].update(output_crop=-1), "output_crop: must be >= 0"),
    (lambda d: d["high"].update(padding="same"), "input_patch: [108, 108, 108] is not valid for depth 3 and same"),
    # Same-padded, a 112 input gives a 112 output, not the 20 the file says.
    (lambda d: d["high"].update(padding="same", input_patch=[112] * 3), "output_patch: [20, 20, 20] does not match"),
])
def test_invalid_plans_name_the_field(tmp_path, edit, field):
    path = _resolved_paper(tmp_path)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=field.replace("[", r"\[").replace("(", r"\(")):
        load_plans(path)


def test_unresolved_field_is_refused_for_stages(tmp_path):
    path = tmp_path / "plans.json"
    save_plans(load_preset("paper"), path)
    with pytest.raises(PlanError, match="intensity.mean: not resolved"):
        load_plans(path)


def test_duplicate_keys_and_nan_are_refused(tmp_path):
    path = tmp_path / "plans.json"
    path.write_text('{"preset": "a", "preset": "b"}')
    with pytest.raises(PlanError, match="duplicate key 'preset'"):
        load_plans(path)
    path.write_text('{"preset": NaN}')
    with pytest.raises(PlanError, match="NaN is not allowed"):
        load_plans(path)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(PlanError, match="known: .*paper"):
        load_preset("gpu-monster")
