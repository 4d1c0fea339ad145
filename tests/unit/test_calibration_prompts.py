"""Calibration prompts from a user file (`prompts_file`) for the calibrating passes, as for the training ones:
ptq and quest_w4a4 calibrate on what the deployed model will be asked (e.g. the digits model's captions)."""

from __future__ import annotations

import pytest

from sdcompiler.passes.errors import PassError
from sdcompiler.passes.ptq import PtqConfig
from sdcompiler.passes.quest.config import QuestConfig
from sdcompiler.passes.teacher_data import load_prompts, take_prompts


def test_take_prompts_reads_the_file_in_order_and_refuses_a_short_one(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("# digits\na handwritten digit zero\n\nthe number 1\na handwritten digit two\n")
    assert take_prompts(PtqConfig(calib_prompts=1, held_out_prompts=1, prompts_file=str(file)), "calib_prompts") == [
        "a handwritten digit zero",
        "the number 1",
    ]
    with pytest.raises(PassError, match=r"4 prompts needed \(calib_prompts=3 \+ held_out_prompts=1\).* has 3"):
        take_prompts(PtqConfig(calib_prompts=3, held_out_prompts=1, prompts_file=str(file)), "calib_prompts")
    assert take_prompts(QuestConfig(calib_prompts=2, held_out_prompts=1), "calib_prompts") == load_prompts()[:3]


@pytest.mark.parametrize("config_class", [PtqConfig, QuestConfig])
def test_the_calibrating_passes_take_a_prompts_file(config_class, tmp_path):
    assert config_class().prompts_file is None
    assert config_class(prompts_file=str(tmp_path / "p.txt")).prompts_file == str(tmp_path / "p.txt")
