"""The `eval` and `saebench` sections: the evaluation stage's samples and SAEBench's offline
evaluations."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from sae_core.config.common import Seed, Strict, check_distinct

# The probe corpus's fields: they reach the evaluation's and SAEBench's addresses through the
# probe set's corpus (sae_core.stages.evaluate.probe_source), never as eval fields, so that the
# addresses of runs that leave them unset are those made before the fields existed.
PROBE_CORPUS_FIELDS = frozenset({"probe_corpus", "probe_text_column"})


class EvalConfig(Strict):
    batch_contexts: int = Field(
        16, ge=1, description="Eval contexts per forward pass (each holds [B, T, vocab] logits)."
    )
    ablation_samples: int = Field(
        128, ge=0, description="Single-latent ablations for ablation sparsity; 0 turns it off."
    )
    ablation_horizon: int = Field(
        16, ge=1, description="Positions from the ablated token on whose logits are compared."
    )
    probe_contexts: int = Field(
        512, ge=0, description="Probe contexts (one per document first); 0 turns probes off."
    )
    probe_tokens: int = Field(8192, ge=1, description="Labelled tokens sampled for token tasks.")
    probe_corpus: str | None = Field(
        None,
        description="The corpus the probe tasks come from, named as data.corpus is (a labelled "
        "one: a genre column, or Brown's part-of-speech tags); None: data.corpus.",
    )
    probe_text_column: str = Field(
        "text", description="eval.probe_corpus's text column (unset corpus: data.text_column)."
    )
    seed: Seed = Field(0, description="Seed of the ablation and probe samples.")

    @model_validator(mode="after")
    def _text_column_of_a_probe_corpus(self) -> EvalConfig:
        if self.probe_corpus is None and self.probe_text_column != "text":
            raise ValueError(
                "eval.probe_text_column applies to eval.probe_corpus, which is unset (the "
                "probes read data.corpus's data.text_column); set eval.probe_corpus or drop it"
            )
        return self


class SaeBenchConfig(Strict):
    """SAEBench's offline evaluations (sae_core.evaluation: saebench_core, sparse_probing,
    absorption), a stage after the evaluation; the probe tasks come from the eval section."""

    enabled: bool = Field(True, description="Run the stage; false skips it.")
    decoder_sample: int = Field(
        4096, ge=1, description="Latents whose max decoder cosine is measured (each vs all n)."
    )
    sparse_probe_ks: list[int] = Field(
        [1, 2, 5, 10, 20], description="k of the k-sparse probes; [] turns them off."
    )
    absorption_words: int = Field(
        1024, ge=0, description="Single-token words sampled for absorption; 0 turns it off."
    )
    icl_examples: int = Field(
        10, ge=0, description="In-context examples per first-letter prompt (SAEBench: 10)."
    )
    batch_prompts: int = Field(32, ge=1, description="First-letter prompts per forward pass.")
    max_k: int = Field(10, ge=1, description="Largest k of absorption's main latents.")
    f1_jump: float = Field(0.03, ge=0, description="F1 gain that makes a k+1th main latent.")
    min_probe_f1: float = Field(
        0.6, ge=0, le=1, description="Ground-truth probe F1 a letter needs to be scored."
    )
    min_letters: int = Field(
        20, ge=1, le=26, description="Scored letters needed for an absorption score."
    )
    seed: Seed = Field(
        0, description="Seed of the word sample, the prompts and the decoder sample."
    )

    @field_validator("sparse_probe_ks")
    @classmethod
    def _distinct_ks(cls, ks: list[int]) -> list[int]:
        if ks:
            check_distinct("saebench.sparse_probe_ks", ks, 1)
        return ks
