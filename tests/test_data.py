"""Tests for metann.data: tasks, samplers, Glyphs and Omniglot (on a fake release)."""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from metann.data import (
    FewShotSampler,
    Glyphs,
    Omniglot,
    SinusoidTaskSampler,
    Task,
    TaskSampler,
    split_classes,
)

try:
    from PIL import Image
except ImportError:  # only the Omniglot tests need Pillow, to write a fake release
    Image = None  # type: ignore[assignment]

needs_pillow = pytest.mark.skipif(Image is None, reason="the Omniglot tests write PNG files with Pillow")


def tasks_equal(a: list[Task], b: list[Task]) -> bool:
    fields = [f.name for f in dataclasses.fields(Task)]
    return len(a) == len(b) and all(
        torch.equal(getattr(s, f), getattr(t, f)) for s, t in zip(a, b, strict=True) for f in fields
    )


# ----------------------------------------------------------------------------------------- Task


def make_task() -> Task:
    return Task(torch.randn(4, 3), torch.arange(4), torch.randn(2, 3), torch.arange(2))


def test_task_support_and_query_are_the_fields(seed):
    task = make_task()
    assert task.support[0] is task.support_x and task.support[1] is task.support_y
    assert task.query[0] is task.query_x and task.query[1] is task.query_y


def test_task_is_frozen(seed):
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_task().support_x = torch.zeros(1)  # type: ignore[misc]


def test_task_to_converts_only_floating_tensors(seed):
    task = make_task()
    new = task.to(dtype=torch.float64)
    assert new is not task
    assert new.support_x.dtype == new.query_x.dtype == torch.float64
    assert new.support_y.dtype == new.query_y.dtype == torch.int64
    assert task.support_x.dtype == torch.float32  # the original is untouched
    assert_close(new.support_x, task.support_x.double())
    assert torch.equal(new.query_y, task.query_y)
    moved = task.to("cpu")
    assert moved.support_x.device.type == "cpu" and moved.support_x.dtype == torch.float32


def test_task_rejects_non_tensors_and_mismatched_lengths():
    with pytest.raises(TypeError, match=re.escape("`Task.query_y` must be a tensor, got `list`")):
        Task(torch.zeros(2, 1), torch.zeros(2), torch.zeros(1, 1), [0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=re.escape("got shapes (3, 1) and (2,)")):
        Task(torch.zeros(3, 1), torch.zeros(2), torch.zeros(1, 1), torch.zeros(1))


def test_samplers_satisfy_the_protocol():
    assert isinstance(SinusoidTaskSampler(seed=0), TaskSampler)
    assert isinstance(FewShotSampler(torch.zeros(4, 1), torch.tensor([0, 0, 1, 1]), 2, 1, 1, seed=0), TaskSampler)
    assert not isinstance(object(), TaskSampler)


# ------------------------------------------------------------------------------------ Sinusoid


def test_sinusoid_shapes_dtypes_and_ranges():
    sampler = SinusoidTaskSampler(
        amp_range=(1.0, 2.0), phase_range=(0.5, 1.0), x_range=(-1.0, 3.0), k_support=7, k_query=3, seed=0
    )
    tasks, amps, phases = sampler.sample_with_params(50)
    assert len(tasks) == 50 and amps.shape == phases.shape == (50,)
    for task, amp, phase in zip(tasks, amps, phases, strict=True):
        assert task.support_x.shape == task.support_y.shape == (7, 1)
        assert task.query_x.shape == task.query_y.shape == (3, 1)
        assert task.support_x.dtype == task.query_y.dtype == torch.float32
        x = torch.cat([task.support_x, task.query_x])
        assert bool((x >= -1.0).all() and (x <= 3.0).all())
        assert_close(task.support_y, amp * torch.sin(task.support_x + phase))
        assert_close(task.query_y, amp * torch.sin(task.query_x + phase))
        assert not torch.equal(task.support_x[:3], task.query_x)  # drawn independently
    assert bool((amps >= 1.0).all() and (amps <= 2.0).all() and (phases >= 0.5).all() and (phases <= 1.0).all())
    assert amps.std() > 0.1 and phases.std() > 0.05  # not a constant


def test_sinusoid_float64_is_the_unrounded_float32():
    wide = SinusoidTaskSampler(seed=3, dtype=torch.float64).sample(2)
    narrow = SinusoidTaskSampler(seed=3).sample(2)
    assert wide[0].support_x.dtype == wide[1].query_y.dtype == torch.float64
    assert torch.equal(wide[0].support_x.float(), narrow[0].support_x)
    assert_close(wide[1].query_y.float(), narrow[1].query_y)


def test_sinusoid_same_seed_same_tasks_and_different_seed_different():
    assert tasks_equal(SinusoidTaskSampler(seed=5).sample(3), SinusoidTaskSampler(seed=5).sample(3))
    assert not torch.equal(
        SinusoidTaskSampler(seed=5).sample(1)[0].support_x, SinusoidTaskSampler(seed=6).sample(1)[0].support_x
    )


def test_sinusoid_stream_does_not_depend_on_batching():
    sampler = SinusoidTaskSampler(seed=1)
    assert tasks_equal(sampler.sample(2) + sampler.sample(3), SinusoidTaskSampler(seed=1).sample(5))


def test_sinusoid_without_seed_follows_torch_manual_seed():
    torch.manual_seed(123)
    first = SinusoidTaskSampler().sample(2)
    torch.manual_seed(123)
    again = SinusoidTaskSampler().sample(2)
    torch.manual_seed(124)
    other = SinusoidTaskSampler().sample(2)
    assert tasks_equal(first, again)
    assert not torch.equal(first[0].support_x, other[0].support_x)


def test_sinusoid_uses_the_given_generator():
    generator = torch.Generator()
    generator.manual_seed(9)
    sampler = SinusoidTaskSampler(generator=generator)
    assert tasks_equal(sampler.sample(2), SinusoidTaskSampler(seed=9).sample(2))
    assert not torch.equal(generator.get_state(), torch.Generator().manual_seed(9).get_state())  # advanced


@pytest.mark.parametrize(
    "make",
    [
        lambda: SinusoidTaskSampler(seed=0),
        lambda: FewShotSampler(torch.arange(40.0), torch.arange(40) % 8, 3, 2, 2, seed=0),
    ],
    ids=["sinusoid", "fewshot"],
)
def test_get_state_set_state_resumes_the_stream(make):
    sampler = make()
    sampler.sample(2)
    state = sampler.get_state()
    assert state.dtype == torch.uint8
    expected = sampler.sample(4)
    fresh = make()
    fresh.set_state(state)
    assert tasks_equal(fresh.sample(4), expected)
    sampler.set_state(state)
    assert tasks_equal(sampler.sample(4), expected)
    with pytest.raises(
        TypeError, match=re.escape("`state` must be a torch.uint8 tensor from `get_state()`, got `list`")
    ):
        sampler.set_state([1, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=re.escape("got a torch.float32 tensor")):
        sampler.set_state(torch.zeros(3))
    with pytest.raises(ValueError, match=re.escape("`state` is not a valid generator state")):
        sampler.set_state(torch.zeros(3, dtype=torch.uint8))
    assert tasks_equal(sampler.sample(1), fresh.sample(1))  # failed calls changed nothing


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"k_support": 0}, ValueError, "`k_support` must be >= 1, got 0."),
        ({"k_query": -1}, ValueError, "`k_query` must be >= 0, got -1."),
        ({"k_support": 2.5}, TypeError, "`k_support` must be an integer, got `float`."),
        ({"amp_range": (2.0, 1.0)}, ValueError, "`amp_range` must be finite with low <= high, got (2.0, 1.0)."),
        ({"x_range": (0.0, math.inf)}, ValueError, "`x_range` must be finite with low <= high"),
        ({"phase_range": 1.0}, TypeError, "`phase_range` must be a pair of numbers (low, high), got 1.0."),
        ({"dtype": torch.int64}, ValueError, "`dtype` must be a floating-point dtype, got torch.int64."),
        ({"dtype": "float32"}, TypeError, "`dtype` must be a `torch.dtype`, got `str`."),
        ({"seed": 1, "generator": torch.Generator()}, ValueError, "Pass `seed` or `generator`, not both."),
        ({"generator": 3}, TypeError, "`generator` must be a `torch.Generator`, got `int`."),
        ({"seed": "1"}, TypeError, "`seed` must be an int or None, got `str`."),
    ],
)
def test_sinusoid_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        SinusoidTaskSampler(**kwargs)


@pytest.mark.parametrize(
    "make",
    [
        lambda: SinusoidTaskSampler(seed=0),
        lambda: FewShotSampler(torch.zeros(4, 1), torch.tensor([0, 0, 1, 1]), 2, 1, 1, seed=0),
    ],
    ids=["sinusoid", "fewshot"],
)
def test_meta_batch_size_is_checked(make):
    sampler = make()
    with pytest.raises(ValueError, match=re.escape("`meta_batch_size` must be >= 1, got 0.")):
        sampler.sample(0)
    with pytest.raises(TypeError, match=re.escape("`meta_batch_size` must be an integer, got `bool`.")):
        sampler.sample(True)


# ------------------------------------------------------------------------------------- FewShot

# 7 classes (labels 10..16) of 10 to 16 examples, interleaved; each input is its own index.
COUNTS = [10, 11, 12, 13, 14, 15, 16]
LABELS = torch.cat([torch.full((n,), 10 + c) for c, n in enumerate(COUNTS)])
LABELS = LABELS[torch.randperm(len(LABELS), generator=torch.Generator().manual_seed(0))]
INPUTS = torch.arange(len(LABELS), dtype=torch.float64).unsqueeze(1)


def check_task(task: Task, ways: int, shots: int, queries: int, classes: set[int] | None = None) -> None:
    """Every property a task of FewShotSampler over (INPUTS, LABELS) must have."""
    assert task.support_x.shape == (ways * shots, 1) and task.query_x.shape == (ways * queries, 1)
    assert task.support_x.dtype == torch.float64
    assert task.support_y.dtype == task.query_y.dtype == torch.int64
    assert torch.equal(task.support_y, torch.arange(ways).repeat_interleave(shots))
    assert torch.equal(task.query_y, torch.arange(ways).repeat_interleave(queries))
    support, query = task.support_x.long().flatten().tolist(), task.query_x.long().flatten().tolist()
    assert len(set(support + query)) == len(support) + len(query)  # no example twice, support and query disjoint
    original: dict[int, set[int]] = {}
    for index, label in zip(support + query, task.support_y.tolist() + task.query_y.tolist(), strict=True):
        original.setdefault(label, set()).add(int(LABELS[index]))
    assert all(len(group) == 1 for group in original.values())  # one class per task label
    chosen = [group.pop() for group in original.values()]
    assert len(set(chosen)) == ways  # distinct classes
    if classes is not None:
        assert set(chosen) <= classes


@settings(max_examples=30, deadline=None)
@given(ways=st.integers(1, 7), shots=st.integers(1, 4), queries=st.integers(0, 6), seed=st.integers(0, 2**31))
def test_fewshot_task_properties(ways, shots, queries, seed):
    sampler = FewShotSampler(INPUTS, LABELS, ways, shots, queries, seed=seed)
    tasks = sampler.sample(3)
    for task in tasks:
        check_task(task, ways, shots, queries)
    assert tasks_equal(tasks, FewShotSampler(INPUTS, LABELS, ways, shots, queries, seed=seed).sample(3))


def test_fewshot_different_seeds_give_different_tasks():
    a = FewShotSampler(INPUTS, LABELS, 5, 2, 3, seed=0).sample(1)[0]
    b = FewShotSampler(INPUTS, LABELS, 5, 2, 3, seed=1).sample(1)[0]
    assert not torch.equal(a.support_x, b.support_x)


def test_fewshot_covers_every_class_and_example():
    tasks = FewShotSampler(INPUTS, LABELS, 2, 1, 1, seed=0).sample(400)
    seen = torch.cat([torch.cat([t.support_x, t.query_x]) for t in tasks]).long().unique()
    assert len(seen) == len(INPUTS)  # all 91 examples get used, none is stuck out of reach


def test_fewshot_classes_restricts_the_pool():
    pool = {11, 13, 16}
    sampler = FewShotSampler(INPUTS, LABELS, 3, 2, 2, seed=0, classes=[16, 11, 13, 11])
    assert sampler.classes == (11, 13, 16)
    for task in sampler.sample(20):
        check_task(task, 3, 2, 2, classes=pool)
    sampler = FewShotSampler(INPUTS, LABELS, 2, 1, 1, seed=0, classes=torch.tensor([12, 15]))
    for task in sampler.sample(5):
        check_task(task, 2, 1, 1, classes={12, 15})


def test_fewshot_device_and_default():
    task = FewShotSampler(INPUTS, LABELS, 2, 1, 1, seed=0, device="cpu").sample(1)[0]
    assert task.support_x.device.type == task.query_y.device.type == "cpu"


def test_split_classes_is_disjoint_complete_and_seeded():
    train, val, test = split_classes(LABELS, (0.6, 0.2, 0.2), seed=0)
    assert (len(train), len(val), len(test)) == (4, 2, 1)  # boundaries round(4.2)=4, round(5.6)=6, 7
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert sorted(train + val + test) == list(range(10, 17))
    assert train == sorted(train)
    assert split_classes(LABELS, (0.6, 0.2, 0.2), seed=0) == (train, val, test)
    splits = {tuple(split_classes(100, (0.5, 0.5), seed=s)[0]) for s in range(3)}
    assert len(splits) == 3  # different seeds, different splits
    assert split_classes([3, 1, 3, 2], (1.0,)) == ([1, 2, 3],)
    halves = split_classes(range(1000), (0.5, 0.5), seed=7)
    assert len(halves[0]) == 500 and not set(halves[0]) & set(halves[1])


def test_split_classes_feeds_fewshot_sampler():
    train, _, test = split_classes(LABELS, seed=0)
    for task in FewShotSampler(INPUTS, LABELS, 2, 1, 2, classes=train, seed=0).sample(10):
        check_task(task, 2, 1, 2, classes=set(train))
    for task in FewShotSampler(INPUTS, LABELS, 1, 1, 2, classes=test, seed=0).sample(10):
        check_task(task, 1, 1, 2, classes=set(test))


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        ((0.5, 0.4), "`fractions` must be non-negative numbers that sum to 1, got (0.5, 0.4)."),
        ((1.2, -0.2), "`fractions` must be non-negative numbers that sum to 1, got (1.2, -0.2)."),
        ((), "`fractions` must be non-negative numbers that sum to 1, got ()."),
    ],
)
def test_split_classes_rejects_bad_fractions(fractions, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        split_classes(LABELS, fractions)


def test_split_classes_rejects_non_integer_labels():
    with pytest.raises(
        TypeError, match=re.escape("`labels_or_classes` must be an integer tensor, got dtype torch.float32")
    ):
        split_classes(torch.zeros(3))
    with pytest.raises(TypeError, match=re.escape("`labels_or_classes` must hold integer class labels")):
        split_classes([1.5, 2.0])


class PairDataset:
    """A plain map-style dataset of `(x, label)` items that counts its reads."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, label_attribute: bool = False) -> None:
        self.inputs, self._labels, self.reads = inputs, labels, 0
        if label_attribute:
            self.labels = labels

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        self.reads += 1
        return self.inputs[index], int(self._labels[index])


@pytest.mark.parametrize("label_attribute", [False, True], ids=["read_items", "labels_attribute"])
def test_fewshot_on_a_dataset_matches_the_tensor_version(label_attribute):
    dataset = PairDataset(INPUTS, LABELS, label_attribute)
    sampler = FewShotSampler(dataset, None, 4, 2, 3, seed=11)
    assert dataset.reads == (1 if label_attribute else len(INPUTS))  # labels read once, or taken from `.labels`
    before = dataset.reads
    tasks = sampler.sample(5)
    assert dataset.reads - before == 5 * 4 * (2 + 3)  # a task reads only its own examples
    assert tasks_equal(tasks, FewShotSampler(INPUTS, LABELS, 4, 2, 3, seed=11).sample(5))
    for task in tasks:
        check_task(task, 4, 2, 3)


def test_fewshot_dataset_with_no_queries():
    task = FewShotSampler(PairDataset(INPUTS, LABELS), None, 3, 2, 0, seed=0).sample(1)[0]
    assert task.query_x.shape == (0, 1) and task.query_x.dtype == torch.float64
    assert task.query_y.shape == (0,)


def test_fewshot_labels_as_tensors_in_a_dataset():
    items = [(torch.full((2,), float(i)), torch.tensor(i % 3)) for i in range(12)]
    task = FewShotSampler(items, None, 3, 2, 2, seed=0).sample(1)[0]
    assert task.support_x.shape == (6, 2)
    originals = task.support_x[:, 0].long() % 3
    assert originals[0] == originals[1] and len(set(originals.tolist())) == 3


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((INPUTS, LABELS, 8, 1, 1), {}, ValueError, "`ways` = 8 but only 7 classes are available."),
        (
            (INPUTS, LABELS, 3, 1, 1),
            {"classes": [10, 11]},
            ValueError,
            "`ways` = 3 but only 2 classes are available in `classes`.",
        ),
        (
            (INPUTS, LABELS, 2, 5, 7),
            {},
            ValueError,
            "every class needs `shots` + `queries` = 5 + 7 = 12 examples, but class 10 has 10, class 11 has 11.",
        ),
        (
            (INPUTS, LABELS, 2, 1, 1),
            {"classes": [10, 99, 5]},
            ValueError,
            "`classes` names labels that no example has: [5, 99].",
        ),
        ((INPUTS, LABELS, 0, 1, 1), {}, ValueError, "`ways` must be >= 1, got 0."),
        ((INPUTS, LABELS, 2, 0, 1), {}, ValueError, "`shots` must be >= 1, got 0."),
        ((INPUTS, LABELS, 2, 1, -1), {}, ValueError, "`queries` must be >= 0, got -1."),
        (
            (INPUTS, LABELS[:-1], 2, 1, 1),
            {},
            ValueError,
            "`inputs` and `labels` must have the same length, got 91 inputs and 90 labels.",
        ),
        (
            (INPUTS.tolist(), LABELS, 2, 1, 1),
            {},
            TypeError,
            "`inputs` must be a tensor when `labels` is given, got `list`.",
        ),
        (
            (INPUTS, None, 2, 1, 1),
            {},
            TypeError,
            "`labels` must be an integer tensor when `inputs` is a tensor, got None.",
        ),
        (
            (INPUTS, LABELS.float(), 2, 1, 1),
            {},
            TypeError,
            "`labels` must be an integer tensor, got dtype torch.float32.",
        ),
        ((INPUTS, LABELS.tolist(), 2, 1, 1), {}, TypeError, "`labels` must be an integer tensor, got `list`."),
        ((INPUTS, LABELS[None], 2, 1, 1), {}, ValueError, "`labels` must be one-dimensional (one label per example)"),
        ((42, None, 2, 1, 1), {}, TypeError, "`inputs` must be a tensor (with `labels`) or a map-style dataset"),
        (
            ([(1.0, 0), (2.0, 1)], None, 2, 1, 0),
            {},
            TypeError,
            "the dataset's inputs must be tensors, item 0 holds `float`.",
        ),
        (([(torch.zeros(1), 0.5)], None, 1, 1, 0), {}, TypeError, "item 0 of the dataset has a label of type `float`"),
        (([torch.zeros(3)], None, 1, 1, 0), {}, TypeError, "item 0 of the dataset is not an `(x, label)` pair"),
        (
            (INPUTS, LABELS, 2, 1, 1),
            {"seed": 0, "generator": torch.Generator()},
            ValueError,
            "Pass `seed` or `generator`, not both.",
        ),
    ],
)
def test_fewshot_rejects_bad_arguments(args, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        FewShotSampler(*args, **kwargs)


# -------------------------------------------------------------------------------------- Glyphs


@pytest.fixture(scope="module")
def glyphs() -> Glyphs:
    return Glyphs(100, 20, seed=0)


def test_glyphs_shapes_labels_and_items(glyphs):
    assert len(glyphs) == 2000
    assert glyphs.images.shape == (2000, 1, 28, 28) and glyphs.images.dtype == torch.float32
    assert torch.equal(glyphs.labels, torch.arange(100).repeat_interleave(20))
    assert float(glyphs.images.min()) >= 0.0 and float(glyphs.images.max()) <= 1.0
    ink = glyphs.images.flatten(1).mean(1)
    assert float(ink.min()) > 0.03 and float(ink.max()) < 0.5  # every image has strokes, none is a blob
    image, label = glyphs[41]
    assert torch.equal(image, glyphs.images[41]) and label == 2 and isinstance(label, int)
    assert glyphs[-1][1] == 99
    with pytest.raises(IndexError, match=re.escape("`Glyphs` index 2000 is out of range for 2000 images.")):
        glyphs[2000]


def test_glyphs_same_seed_same_images_different_seed_different(glyphs):
    small = Glyphs(5, 3, seed=0)
    assert torch.equal(small.images, Glyphs(5, 3, seed=0).images)
    other = Glyphs(5, 3, seed=1)
    assert (small.images - other.images).abs().mean() > 0.05


def test_glyphs_dtype_size_and_options():
    wide = Glyphs(3, 2, seed=0, dtype=torch.float64, image_size=16)
    assert wide.images.dtype == torch.float64 and wide.images.shape == (6, 1, 16, 16)
    clean = Glyphs(4, 3, seed=0, distortion=0.0, noise=0.0)
    assert torch.equal(clean.images[0], clean.images[2]) and not torch.equal(clean.images[0], clean.images[3])
    jittered = Glyphs(4, 3, seed=0, noise=0.0)
    assert not torch.equal(jittered.images[0], jittered.images[1])


def test_glyphs_generate_fast():
    start = time.perf_counter()
    Glyphs(100, 20, seed=3)
    assert time.perf_counter() - start < 5.0  # about 0.2 s on one CPU thread


def nearest_centroid_accuracy(dataset: Glyphs, shots: int, tasks: int = 200) -> float:
    correct = total = 0
    for task in FewShotSampler(dataset, None, 5, shots, 15, seed=0).sample(tasks):
        centroids = task.support_x.flatten(1).view(5, shots, -1).mean(1)
        predicted = torch.cdist(task.query_x.flatten(1), centroids).argmin(1)
        correct += int((predicted == task.query_y).sum())
        total += len(predicted)
    return correct / total


def test_glyphs_are_learnable_but_not_trivial(glyphs):
    one_shot = nearest_centroid_accuracy(glyphs, shots=1)
    five_shot = nearest_centroid_accuracy(glyphs, shots=5)
    assert 0.3 < one_shot < 0.95, one_shot  # chance is 0.2; measured 0.745
    assert one_shot + 0.05 < five_shot < 0.99, (one_shot, five_shot)  # more shots help; measured 0.928


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_classes": 0}, ValueError, "`num_classes` must be >= 1, got 0."),
        ({"num_classes": 2, "examples_per_class": 0}, ValueError, "`examples_per_class` must be >= 1, got 0."),
        ({"num_classes": 2, "strokes": (3, 2)}, ValueError, "`strokes` must have fewest <= most, got (3, 2)."),
        ({"num_classes": 2, "strokes": 3}, TypeError, "`strokes` must be a pair (fewest, most), got 3."),
        ({"num_classes": 2, "noise": -0.1}, ValueError, "`noise` must be finite and >= 0, got -0.1."),
        ({"num_classes": 2, "distortion": "big"}, TypeError, "`distortion` must be a number, got `str`."),
        ({"num_classes": 2, "seed": None}, TypeError, "`seed` must be an int, got `NoneType`."),
        ({"num_classes": 2, "dtype": torch.int32}, TypeError, "`dtype` must be a floating-point `torch.dtype`"),
    ],
)
def test_glyphs_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        Glyphs(**kwargs)


# ------------------------------------------------------------------------------------ Omniglot

# A fake release: alphabet -> number of images of each character.
BACKGROUND = {"Alpha": [3, 2, 4], "Beta": [2, 3]}
EVALUATION = {"Gamma": [2, 2]}


def fake_png(number: int) -> Image.Image:  # type: ignore[name-defined]
    """A 105x105 bilevel image like Omniglot's, white with a black bar whose place encodes `number`."""
    image = Image.new("1", (105, 105), 1)
    row, column = divmod(number, 7)
    for y in range(8 + 12 * row, 14 + 12 * row):
        for x in range(5 + 14 * column, 20 + 14 * column):
            image.putpixel((x, y), 0)
    return image


def write_release(root: Path, folder: str, spec: dict[str, list[int]]) -> list[torch.Tensor]:
    """Write `root/folder/<alphabet>/<character>/*.png` and return the expected inverted images, in order."""
    expected, number = [], 0
    for alphabet, counts in spec.items():
        for c, count in enumerate(counts):
            directory = root / folder / alphabet / f"character{c + 1:02d}"
            directory.mkdir(parents=True)
            (directory / "Thumbs.db").write_bytes(b"not an image")
            for k in range(count):
                image = fake_png(number)
                image.save(directory / f"{number:04d}_{k + 1:02d}.png")
                pixels = torch.frombuffer(bytearray(image.convert("L").tobytes()), dtype=torch.uint8).view(1, 105, 105)
                expected.append(1 - pixels / 255)
                number += 1
    (root / folder / "README.txt").write_text("not an alphabet")
    return expected


def zip_release(root: Path, folder: str, target: Path) -> None:
    with zipfile.ZipFile(target / f"{folder}.zip", "w") as archive:
        for path in sorted((root / folder).rglob("*")):
            archive.write(path, path.relative_to(root).as_posix())  # also writes the directory entries


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict[str, object]:
    folders = tmp_path_factory.mktemp("omniglot_folders")
    zips = tmp_path_factory.mktemp("omniglot_zips")
    background = write_release(folders, "images_background", BACKGROUND)
    evaluation = write_release(folders, "images_evaluation", EVALUATION)
    zip_release(folders, "images_background", zips)
    zip_release(folders, "images_evaluation", zips)
    return {"folders": folders, "zips": zips, "background": background, "evaluation": evaluation}


@needs_pillow
@pytest.mark.parametrize("layout", ["folders", "zips"])
def test_omniglot_counts_labels_and_pixels(release, layout):
    ds = Omniglot(release[layout], image_size=None)
    assert len(ds) == 14 and ds.num_classes == 5
    assert ds.characters == [
        ("Alpha", "character01"),
        ("Alpha", "character02"),
        ("Alpha", "character03"),
        ("Beta", "character01"),
        ("Beta", "character02"),
    ]
    assert torch.equal(ds.labels, torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4, 4]))
    for i, expected in enumerate(release["background"]):
        image, label = ds[i]
        assert label == int(ds.labels[i]) and isinstance(label, int)
        assert image.dtype == torch.float32
        assert torch.equal(image, expected)  # strokes are 1.0, background 0.0
    assert ds.source == release[layout] / ("images_background" + ("" if layout == "folders" else ".zip"))


@needs_pillow
@pytest.mark.parametrize("layout", ["folders", "zips"])
def test_omniglot_evaluation_set(release, layout):
    ds = Omniglot(release[layout], background=False, image_size=None)
    assert len(ds) == 4 and ds.num_classes == 2 and ds.characters[0] == ("Gamma", "character01")
    assert torch.equal(ds.labels, torch.tensor([0, 0, 1, 1]))
    assert torch.equal(ds[3][0], release["evaluation"][3])


@needs_pillow
def test_omniglot_resizes_and_zip_equals_folder(release):
    from_folders = Omniglot(release["folders"], dtype=torch.float64)
    from_zips = Omniglot(release["zips"], dtype=torch.float64)
    for i in range(len(from_folders)):
        image, label = from_folders[i]
        assert image.shape == (1, 28, 28) and image.dtype == torch.float64
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        assert float(image.max()) > 0.5 and float(image[0, -1, -1]) == 0.0  # a 6-pixel bar, blank paper
        assert torch.equal(image, from_zips[i][0]) and label == from_zips[i][1]
    small = Omniglot(release["folders"], image_size=14)
    assert small[0][0].shape == (1, 14, 14)


@needs_pillow
def test_omniglot_rotations_are_new_classes(release):
    base = Omniglot(release["zips"], image_size=None)
    ds = Omniglot(release["zips"], image_size=None, rotations=True)
    n, classes = len(base), base.num_classes
    assert len(ds) == 4 * n and ds.num_classes == 4 * classes
    assert torch.equal(ds.labels, torch.cat([base.labels + r * classes for r in range(4)]))
    for r in range(4):
        for j in (0, n - 1):
            image, label = ds[r * n + j]
            assert label == base[j][1] + r * classes
            assert torch.equal(image, torch.rot90(base[j][0], r, dims=(1, 2)))
    assert not torch.equal(ds[n][0], ds[0][0])  # the bar is off-centre, so a rotation changes it


@needs_pillow
def test_omniglot_transform_and_index_errors(release):
    ds = Omniglot(release["folders"], transform=lambda image: image * 2)
    assert_close(ds[0][0], Omniglot(release["folders"])[0][0] * 2)
    with pytest.raises(IndexError, match=re.escape("`Omniglot` index 14 is out of range for 14 images.")):
        ds[14]
    with pytest.raises(TypeError, match=re.escape("`transform` must be callable or None, got `int`.")):
        Omniglot(release["folders"], transform=3)  # type: ignore[arg-type]


@needs_pillow
def test_omniglot_feeds_fewshot_sampler(release):
    ds = Omniglot(release["zips"], rotations=True)
    train, test = split_classes(ds.labels, (0.5, 0.5), seed=0)
    sampler = FewShotSampler(ds, None, 3, 1, 1, classes=train, seed=0)
    task = sampler.sample(1)[0]
    assert task.support_x.shape == (3, 1, 28, 28) and torch.equal(task.query_y, torch.arange(3))
    assert set(train).isdisjoint(test) and len(train) + len(test) == 20


@needs_pillow
def test_omniglot_missing_files(tmp_path, release):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(f"Omniglot root {str(missing)!r} is not a directory")):
        Omniglot(missing)
    with pytest.raises(
        FileNotFoundError,
        match=re.escape(
            f"found neither the folder {str(tmp_path / 'images_evaluation')!r} "
            f"nor the zip {str(tmp_path / 'images_evaluation.zip')!r}"
        ),
    ):
        Omniglot(tmp_path, background=False)
    (tmp_path / "images_background" / "Alpha" / "character01").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=re.escape("no PNG images found in")):
        Omniglot(tmp_path)
    (tmp_path / "images_evaluation.zip").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=re.escape("is not a valid zip file")):
        Omniglot(tmp_path, background=False)


@needs_pillow
def test_omniglot_zip_without_the_expected_folder(tmp_path):
    with zipfile.ZipFile(tmp_path / "images_background.zip", "w") as archive:
        archive.writestr("other/Alpha/character01/a.png", b"")
    with pytest.raises(FileNotFoundError, match=re.escape("expected `images_background/<alphabet>/<character>/*.png`")):
        Omniglot(tmp_path)


@needs_pillow
def test_omniglot_without_pillow(release, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=re.escape("`pip install Pillow` (or `pip install metann[dev]`)")):
        Omniglot(release["folders"])
