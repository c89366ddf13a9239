"""Streaming image-text pairs from webdataset tar shards (LAION and any ``{key}.jpg + {key}.json`` tars).

``webdataset`` is imported only when iteration starts. Shard patterns use brace ranges
(``laion/{00000..00099}.tar``, zero padding kept) and alternatives (``{a,b}``).

Determinism and resume: the shard order, shuffle buffer and caption picks are drawn from an RNG
seeded by (seed, epoch, rank, worker). ``set_resume_step(step, batch_size)`` makes the next
iteration skip exactly the samples that the first ``step`` batches consumed, so a resumed run
sees the same stream as an uninterrupted one. Unreadable images are skipped (counted, warned)
without shrinking batches: the stream simply yields the next good sample.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from typing import Any, Callable, Iterator, Sequence

from torch.utils.data import IterableDataset

from datasets.base_dataset import collate_samples
from datasets.media import BadMediaError, decode_image_bytes, report_bad_media
from datasets.sharding import stream_position

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b{x,y}`` -> a00bx, a00by, a01bx, ... (zero padding taken from the range ends)."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    range_match = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if range_match:
        lo_s, hi_s = range_match.groups()
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise ValueError(f"shard pattern {pattern!r}: empty range {{{body}}}")
        width = len(lo_s) if lo_s.startswith("0") or len(lo_s) == len(hi_s) else 0
        options = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [e for opt in options for e in expand_braces(head + opt + tail)]


def expand_shards(urls: str | Sequence[str]) -> list[str]:
    """Expand one pattern, a ``::``-separated string of patterns, or a list of them."""
    if isinstance(urls, str):
        urls = urls.split("::")
    shards = [s for u in urls for s in expand_braces(str(u))]
    if not shards:
        raise ValueError("no webdataset shards given")
    return shards


def _stable_id(*parts: str) -> int:
    """A 62-bit int id stable across processes (Python's hash() is salted per process)."""
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2


class WebDatasetStream(IterableDataset):
    """Infinite (``resampled``) or per-epoch stream of ``{"image", "text_input", "image_id", "instance_id"}``."""

    def __init__(
        self,
        urls: str | Sequence[str],
        vis_processor: Callable | None = None,
        text_processor: Callable | None = None,
        *,
        resampled: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        text_field: str = "caption",
        caption_choice: str = "first",
        bad_media_policy: str = "skip",
        samples_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        self.shards = expand_shards(urls)
        self.vis_processor = vis_processor or (lambda x: x)
        self.text_processor = text_processor or (lambda x: x)
        self.resampled = resampled
        self.shuffle_buffer = max(int(shuffle_buffer), 1)
        self.seed = seed
        self.text_field = text_field
        if caption_choice not in ("first", "random"):
            raise ValueError(f"caption_choice={caption_choice!r}; expected 'first' or 'random'")
        self.caption_choice = caption_choice
        if bad_media_policy not in ("skip", "error"):
            raise ValueError(f"bad_media_policy={bad_media_policy!r}; expected 'skip' or 'error'")
        self.bad_media_policy = bad_media_policy
        self.samples_per_epoch = samples_per_epoch
        self.epoch = 0
        self.resume_step = 0
        self.resume_batch_size = 0
        self.num_bad_media = 0

    # -- position ----------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_resume_step(self, step: int, batch_size: int) -> None:
        """Skip what ``step`` batches of ``batch_size`` consumed (DataLoader workers go round-robin)."""
        self.resume_step, self.resume_batch_size = int(step), int(batch_size)

    # -- stream -------------------------------------------------------------------------------
    def _shard_stream(self, rng: random.Random, consumer: int, num_consumers: int) -> Iterator[str]:
        if self.resampled:
            while True:
                yield rng.choice(self.shards)
        order = list(self.shards)
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)  # same on every consumer
        mine = order[consumer::num_consumers]
        if not mine:
            raise ValueError(
                f"{len(self.shards)} shard(s) for {num_consumers} ranks x workers: some get none; "
                "use resampled: true, more shards or fewer workers"
            )
        if self.samples_per_epoch is None:
            yield from mine
        else:
            while True:  # cycle so every consumer can fill its fixed share
                yield from mine

    def _raw_samples(self, rng: random.Random, consumer: int, num_consumers: int) -> Iterator[dict[str, Any]]:
        try:
            import webdataset as wds  # webdataset: seconds to import, only for streamed shards
        except ImportError as e:
            raise ImportError("streaming tar shards needs webdataset: pip install webdataset") from e

        def on_error(exc: Exception) -> bool:
            logger.warning("webdataset: skipped a broken shard member (%s)", exc)
            return True

        urls = ({"url": u} for u in self._shard_stream(rng, consumer, num_consumers))
        buffer: list[dict[str, Any]] = []
        for raw in wds.tarfile_samples(urls, handler=on_error):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(raw)
                continue
            k = rng.randrange(len(buffer))
            buffer[k], raw = raw, buffer[k]
            yield raw
        rng.shuffle(buffer)
        yield from buffer

    def _decode(self, raw: dict[str, Any], rng: random.Random) -> tuple[Any, str] | None:
        name = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        try:
            if ext is None:
                raise BadMediaError(name, f"no image member ({'/'.join(IMAGE_EXTENSIONS)}); has {sorted(raw)}")
            image = decode_image_bytes(raw[ext], f"{name}.{ext}")
        except BadMediaError as e:
            if self.bad_media_policy == "error":
                raise
            self.num_bad_media += 1
            report_bad_media(logger, type(self).__name__, e, self.num_bad_media)
            return None
        caption: Any = None
        if "json" in raw:
            caption = json.loads(raw["json"]).get(self.text_field)
        if caption is None and "txt" in raw:
            caption = raw["txt"].decode("utf-8")
        if caption is None:
            raise KeyError(f"sample {name}: no caption (json field {self.text_field!r} or a .txt member)")
        if isinstance(caption, (list, tuple)):
            caption = caption[0] if self.caption_choice == "first" else rng.choice(list(caption[:2]))
        return image, str(caption)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        pos = stream_position(self.resume_step)
        if pos.world > 1 and not self.resampled and self.samples_per_epoch is None:
            logger.warning(
                "WebDatasetStream: resampled=False without samples_per_epoch on %d ranks: ranks may run out "
                "of samples at different steps (set samples_per_epoch, or resampled: true)", pos.world,
            )
        rng = pos.rng(self.seed, self.epoch)
        to_skip = pos.samples_to_skip(self.resume_step, self.resume_batch_size)
        limit = None
        if self.samples_per_epoch is not None:  # this worker's share of the rank's fixed length
            limit = self.samples_per_epoch // pos.num_workers + (pos.worker < self.samples_per_epoch % pos.num_workers)
        produced = 0
        for raw in self._raw_samples(rng, pos.consumer, pos.num_consumers):
            if limit is not None and produced >= limit:
                return
            decoded = self._decode(raw, rng)
            if decoded is None:
                continue
            produced += 1
            if to_skip > 0:
                to_skip -= 1
                continue
            image, caption = decoded
            key = str(raw.get("__key__"))
            yield {
                "image": self.vis_processor(image),
                "text_input": self.text_processor(caption),
                "image_id": _stable_id(str(raw.get("__url__")), key),
                "instance_id": key,
            }

    def collater(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate_samples(samples)

    def __repr__(self) -> str:
        return f"WebDatasetStream({len(self.shards)} shards, resampled={self.resampled}, seed={self.seed})"
