"""The estimates stage's messages (jaxgrad.estimate.stage)."""

import warnings

from jaxgrad.estimate import stage


def test_repeated_subsets_are_one_line_naming_the_config_keys_not_a_raw_warning(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a UserWarning escaping the stage fails here
        subsets = stage._sample(4, 10, 2, seed=0)  # C(4, 2) = 6 distinct subsets for 10
    assert subsets.shape == (10, 4) and len({r.tobytes() for r in subsets}) == 6
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["[jaxgrad] estimates: only 6 distinct subsets of 2 of 4 sources exist; 4 of "
                   "the 10 repeat (config.surrogate.num_subsets = 10, subset_size = 2 of 4: "
                   "fewer subsets or another size would not repeat any)"], out


def test_enough_distinct_subsets_print_nothing(capsys):
    stage._sample(6, 10, 3, seed=0)
    assert capsys.readouterr().out == ""
