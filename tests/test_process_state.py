"""A library call changes nothing of the process: logger levels and filters' effect, warning
filters, progress-bar settings and torch's thread count are the caller's, during and after edits,
also when two edits on two different models overlap in threads (held together by barriers where
fireflow once changed process state: prompt encoding, grid building, the passes)."""

from __future__ import annotations

import logging
import threading
import warnings

import torch

from fireflow import FireFlowEditor

LOGGERS = ("diffusers", "transformers", "diffusers.pipelines.flux.pipeline_flux", "diffusers.configuration_utils")


def snapshot() -> dict:
    import diffusers
    import transformers

    return {
        "levels": {n: logging.getLogger(n).level for n in LOGGERS},
        "effective": {n: logging.getLogger(n).getEffectiveLevel() for n in LOGGERS},
        "warning_filters": list(warnings.filters),
        "diffusers_bars": diffusers.utils.logging.is_progress_bar_enabled(),
        "transformers_bars": transformers.utils.logging.is_progress_bar_enabled(),
        "threads": torch.get_num_threads(),
    }


class Barriers:
    """Wraps an adapter's prompt encoding, grid and velocity so that two edits meet at each."""

    def __init__(self, adapters, seen: list):
        self.points = {name: threading.Barrier(len(adapters)) for name in ("encode_prompt", "timesteps", "velocity")}
        self.seen = seen
        for a in adapters:
            for name in self.points:
                setattr(a, name, self.wrap(name, getattr(a, name)))

    def wrap(self, name, fn):
        barrier, first = self.points[name], threading.local()

        def inner(*args, **kwargs):
            if not getattr(first, "done", False):
                first.done = True
                barrier.wait(timeout=60)
                self.seen.append((name, snapshot()))  # the state while both edits are inside
                out = fn(*args, **kwargs)
                self.seen.append((name, snapshot()))
                return out
            return fn(*args, **kwargs)

        return inner


def test_overlapping_edits_on_two_models_leave_the_process_alone(tiny_flux_dir, boy_jpg):
    torch.set_num_threads(2)  # a caller's setting that is not the demo's old pin of 1
    logging.getLogger("diffusers").setLevel(logging.INFO)
    try:
        before = snapshot()
        jobs = {
            "scenes": ("scenes", "examples/red_apple.png", "red apple, sky blue background", "green apple"),
            "flux": (tiny_flux_dir, boy_jpg, "a boy", "a girl " * 200),  # a long prompt: truncation notices
        }
        solo = {}
        for key, (model, image, src, tgt) in jobs.items():
            ed = FireFlowEditor.from_pretrained(model, device="cpu", torch_dtype="fp32")
            solo[key] = ed.edit(image, src, tgt, num_steps=3).latents
        editors = {
            key: FireFlowEditor.from_pretrained(m, device="cpu", torch_dtype="fp32") for key, (m, *_) in jobs.items()
        }
        after_load = snapshot()
        seen: list = []
        Barriers([e.adapter for e in editors.values()], seen)
        results, errors = {}, []

        def run(key):
            try:
                _, image, src, tgt = jobs[key]
                results[key] = editors[key].edit(image, src, tgt, num_steps=3).latents
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(k,)) for k in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert len(seen) == 12  # 3 meeting points x 2 edits x (on arrival, after the call)
        for where, state in seen:
            assert state == before, where
        assert snapshot() == before == after_load
        for key in jobs:
            torch.testing.assert_close(results[key], solo[key], rtol=0, atol=0)
    finally:
        logging.getLogger("diffusers").setLevel(logging.NOTSET)
        torch.set_num_threads(1)
