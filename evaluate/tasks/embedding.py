"""Embedding (encoders without a head: BertModel, e.g. a sentence-transformers folder): how close
each variant's sentence vectors stay to the base's.

    sentences  `hubquant.evaluate.encoder.SENTENCE_RULE`: the text's paragraphs, whitespace
               collapsed, split after . ! or ? and a space; pieces of 20..300 characters with at
               least 3 words, each kept once; the first `max_sentences` (default 512).
    vectors    `hubquant.embed` with the base checkpoint's declared pipeline (pooling,
               normalisation, truncation, lower-casing), for the base and every variant.
    cosine     Per sentence, cos(base vector, variant vector) in float64: mean and minimum.
    neighbours Each sentence's k = min(10, sentences - 1) nearest other sentences under the base's
               vectors and under the variant's: |overlap| / k, averaged (`nn_agreement`, 0..1).
    verdict    A variant passes when its mean cosine is at least `min_cosine` (default 0.99).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from hubquant.errors import HubquantError
from hubquant.evaluate.settings import DEFAULT_MIN_COSINE

from .base import DATASET_COLUMNS, MB, MEMORY, SIZE, Figure, Label, fmt, shared
from .encoders import ENCODE, ENCODE_BATCH, SPEED_COLUMNS, EncoderTask, encode_caption, values

if TYPE_CHECKING:
    from hubquant.evaluate.data import Text
    from hubquant.evaluate.results import Row

FIGURES: tuple[Figure, ...] = (
    Figure(
        "cos_mean",
        "cos_mean",
        "cosine mean",
        meaning="mean cosine similarity of each sentence's vector to the base's vector of it",
        digits=6,
    ),
    Figure("cos_min", "cos_min", "cosine min", meaning="the least of those cosines", digits=6),
    Figure(
        "nn_agreement",
        "nn_agreement (%)",
        "NN@k agree",
        "%",
        scale=100,
        meaning="share of each sentence's k nearest neighbours (by cosine, among the other sentences; "
        "k = 10 unless there are fewer) that are also its nearest under the base, averaged",
    ),
)


class Embedding(EncoderTask):
    """Sentence embedders, judged on the cosine of their vectors to the base's."""

    name = "embedding"
    mlm_head = False
    figures = (*FIGURES, *SIZE, ENCODE, *MEMORY)
    method_labels: ClassVar[dict[str, Label]] = {
        **shared("dtype", "speed_runs"),
        "sentence_rule": Label("sentences"),
        "sentences": Label("sentences embedded"),
        "max_sentences": Label("max sentences"),
        "pooling": Label("sentence vectors"),
        "nn_k": Label("neighbours compared (k)"),
        "cosine": Label("cosine"),
        **shared("encode_batch", "encode_length"),
    }
    budget_labels: ClassVar[dict[str, Label]] = {"min_cosine": Label("min mean cosine to base")}
    method_columns = (
        *DATASET_COLUMNS,
        ("method", "sentences", "sentences"),
        ("method", "nn_k", "nn_k"),
        ("method", "pooling", "pooling"),
        *SPEED_COLUMNS,
    )

    def check(self) -> None:
        super().check()
        s = self.settings
        given = [
            f
            for f, v in (("--ctx", s.ctx), ("--max-chunks", s.max_chunks), ("--max-tokens", s.max_tokens))
            if v
        ]
        if given:
            raise HubquantError(
                f"{given[0]} applies to text windows, and this encoder has no masked-LM head (an embedder, "
                "judged on sentences); drop it, or use --max-sentences"
            )
        if s.max_sentences is not None and s.max_sentences < 2:
            raise HubquantError(f"--max-sentences {s.max_sentences}: neighbours need at least 2 sentences")

    def budget(self) -> dict[str, float]:
        return {"min_cosine": self.settings.min_cosine}

    def prepare(self, base: Any, tokenizer: Any, text: Text) -> dict[str, Any]:
        import torch

        from hubquant.evaluate.encoder import (
            DEFAULT_MAX_SENTENCES,
            NN_K,
            SENTENCE_CHARS,
            SENTENCE_RULE,
            split_sentences,
        )
        from hubquant.models.embed import embed

        s = self.settings
        self.frame(base, tokenizer)
        limit = DEFAULT_MAX_SENTENCES if s.max_sentences is None else s.max_sentences
        self.sentences = split_sentences(text.text, limit)
        if len(self.sentences) < 2:
            raise HubquantError(
                f"{text.name} has {len(self.sentences)} sentences of {SENTENCE_CHARS[0]}..{SENTENCE_CHARS[1]} "
                "characters; an embedder needs at least 2: use a longer --dataset"
            )
        sentence = getattr(base, "sentence", None)
        nn_k = min(NN_K, len(self.sentences) - 1)
        method = {
            "sentence_rule": SENTENCE_RULE, "sentences": len(self.sentences), "max_sentences": limit,
            "pooling": sentence.describe() if sentence is not None else None,
            "nn_k": nn_k, "cosine": "per sentence against the base's vector, float64", "dtype": s.dtype,
            **self.speed_method(),
        }  # fmt: skip
        self._headline = f"{len(self.sentences)} sentences, top-{nn_k} neighbours"
        self.base_vectors = embed(base, self.sentences, batch_size=ENCODE_BATCH, progress=s.progress)
        ids = tokenizer.encode(" ".join(self.sentences), add_special_tokens=False)
        self.time_ids(torch.tensor(ids, dtype=torch.long))
        return method

    def headline(self) -> str:
        return self._headline

    def measure(self, model: Any, base: Any, variant: str = "variant") -> dict[str, Any]:
        from hubquant.evaluate.encoder import NN_K, embedding_agreement
        from hubquant.models.embed import embed

        vectors = (
            self.base_vectors
            if model is base
            else embed(model, self.sentences, batch_size=ENCODE_BATCH, progress=self.settings.progress)
        )
        return {**embedding_agreement(self.base_vectors, vectors, NN_K), **self.measure_speed(model)}

    @classmethod
    def passes(cls, row: Row, budget: Mapping[str, Any]) -> bool:
        cos = row.get("cos_mean")
        return cos is not None and cos >= budget.get("min_cosine", DEFAULT_MIN_COSINE)

    @classmethod
    def budget_text(cls, budget: Mapping[str, Any]) -> str:
        return (
            f"mean cosine to the base's sentence vectors >= {budget.get('min_cosine', DEFAULT_MIN_COSINE):g}"
        )

    @classmethod
    def verdict_figures(cls, row: Row) -> str:
        cos_min, nn = row.get("cos_min"), row.get("nn_agreement")
        return (
            f"mean cosine {row.get('cos_mean'):.4f}"
            + (f", min cosine {cos_min:.4f}" if cos_min is not None else "")
            + (f", nearest-neighbour agreement {nn:.1%}" if nn is not None else "")
        )

    @classmethod
    def line(cls, row: Row) -> str:
        nn = row.get("nn_agreement")
        return (
            f"{row.variant:10} cosine mean {fmt(row.get('cos_mean'), '.5f')} min {fmt(row.get('cos_min'), '.5f')}  "
            f"NN agreement {fmt(nn and nn * 100, '.1f')}%  encode {fmt(row.get('encode_seq_s'), '.1f')} seq/s  "
            f"disk {fmt(row.disk_bytes and row.disk_bytes / MB, '.1f')} MB"
        )

    @classmethod
    def caption(cls, results: Any) -> str | None:
        v = values(results.get("method") or {})
        dataset = (results.get("dataset") or {}).get("name", "—")
        return (
            f"Sentence vectors: {v('sentences')} sentences of {dataset} ({v('sentence_rule')}), "
            f"embedded by the base and by each variant with {v('pooling')}, {v('dtype')}. Cosine: each "
            "sentence's vector against the base's (mean, min). NN@k agreement: overlap of each "
            f"sentence's top-{v('nn_k')} nearest neighbours (cosine, among the other sentences) "
            "under the variant and under the base. ± is the standard deviation (speed). "
            + encode_caption(results)
        )
