"""An encoder + pooling + one-logit regression head, saved so `AutoModelForSequenceClassification` loads it.

Why a custom class instead of stock `BertForSequenceClassification` (what HuggingFaceFW/fineweb-edu-classifier is):
the stock class scores the BERT pooler output (a tanh layer on [CLS]), and mean pooling over tokens was clearly better
for the same frozen encoder and ridge head. So the saved folder carries this file and an `auto_map`, and loads with
`AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)`. Its output is the same as the
official classifier's: `logits` of shape (batch, 1), the raw educational score.

The file is self-contained (only torch and transformers) because `save_pretrained` copies it next to the weights.

Intermediate layers: pooling the last layer alone is what sentence embeddings do, but a quality judgement also
depends on form (structure, comments, style) that middle layers keep better; `pool_layers` lists the hidden states
(0 = embeddings) whose pooled vectors are concatenated. The measurements behind both choices are in
benchmarks/RESULTS.md ("Classifier design choices").

Everything needed to use the model is in the config: encoder config and name, pooling and pooled layers,
max_seq_length (tokens per sequence; `max_length` is reserved for generation in transformers), calibration cut
points, the long-document strategy, and the kind (web/code) and method (head/finetune) it was trained with.
"""

from __future__ import annotations

import threading

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

POOLINGS = ("mean", "cls")
# encoders whose hidden state i is the output of encoder.layer[i-1], so it can be pooled as that block returns
BLOCKS_MAKE_HIDDEN_STATES = ("bert", "roberta", "xlm-roberta", "electra", "camembert")


class EduClassifierConfig(PretrainedConfig):
    model_type = "edu_classifier"

    def __init__(
        self,
        encoder_config: dict | None = None,
        encoder_name: str | None = None,
        pooling: str = "mean",
        pool_layers: list[int] | None = None,
        max_seq_length: int = 512,
        long_docs: str = "truncate",
        max_chunks: int = 16,
        cut_points: list[float] | None = None,
        kind: str = "web",
        method: str = "head",
        **kwargs,
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        kwargs.setdefault("num_labels", 1)
        kwargs.setdefault("problem_type", "regression")
        self.encoder_config = encoder_config or {}
        self.encoder_name = encoder_name
        self.pooling = pooling
        self.pool_layers = list(pool_layers) if pool_layers else [-1]
        self.max_seq_length = max_seq_length
        self.long_docs = long_docs
        self.max_chunks = max_chunks
        self.cut_points = cut_points
        self.kind = kind
        self.method = method
        super().__init__(**kwargs)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Mean over real (non-padding) tokens, or the first token's vector. The mean is taken in float32: in bfloat16 a
    count of tokens is inexact past 256 (301 ones sum to 300), and so is a sum of that many vectors."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).float()
    return (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class EduClassifierForSequenceClassification(PreTrainedModel):
    config_class = EduClassifierConfig
    base_model_prefix = "edu_classifier"
    _supports_sdpa = True
    # the head stays float32 in a bfloat16 model: its weights, folded from standardised features, reach ~1e6
    _keep_in_fp32_modules_strict = ["classifier"]

    def __init__(self, config: EduClassifierConfig, encoder: PreTrainedModel | None = None):
        """`encoder`: an already loaded pretrained encoder (when training); otherwise one is built from the config."""
        super().__init__(config)
        # the encoder's saved dtype left out: it is built in the dtype this model is loaded in
        self.encoder = encoder if encoder is not None else AutoModel.from_config(AutoConfig.for_model(
            **{k: v for k, v in config.encoder_config.items() if k not in ("dtype", "torch_dtype")}))
        self.classifier = nn.Linear(self.encoder.config.hidden_size * len(config.pool_layers), 1)
        self.post_init()

    def _init_weights(self, module):
        if module is getattr(self, "classifier", None):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled vectors of the chosen layers, concatenated (batch, hidden * len(pool_layers)): what the head reads.
        No mask means no padding: the encoder gets none either, so SDPA may use its flash kernel."""
        encoder_mask = attention_mask
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        layers, pooling = self.config.pool_layers, self.config.pooling
        if layers == [-1]:
            return pool(self.encoder(input_ids=input_ids, attention_mask=encoder_mask).last_hidden_state,
                        attention_mask, pooling)
        if self.encoder.config.model_type in BLOCKS_MAKE_HIDDEN_STATES and not torch.is_grad_enabled():
            return self._pool_as_they_pass(input_ids, encoder_mask, attention_mask)
        # training keeps every hidden state for the backward pass anyway
        hidden = self.encoder(input_ids=input_ids, attention_mask=encoder_mask, output_hidden_states=True).hidden_states
        return torch.cat([pool(hidden[i], attention_mask, pooling) for i in layers], dim=-1)

    def _pool_as_they_pass(self, input_ids, encoder_mask, attention_mask) -> torch.Tensor:
        """The pooled layers of a BERT-family encoder, each pooled as the block making it returns: hidden state i is
        the output of block i-1 (0: the input of block 0) and the last is `last_hidden_state`. Asking the encoder for
        its hidden states instead would hold all of them until the end: 13 x batch x tokens x hidden for BERT-base,
        ~10 GB of GPU memory at 1,024 documents of 512 tokens in bf16, where this holds one at a time."""
        blocks = self.encoder.encoder.layer
        n, pooling, caller = len(blocks), self.config.pooling, threading.get_ident()
        if any(not -(n + 1) <= i <= n for i in self.config.pool_layers):
            raise IndexError(f"pool_layers {self.config.pool_layers}: this encoder has hidden states 0..{n}")
        wanted = {i % (n + 1) for i in self.config.pool_layers}
        pooled: dict[int, torch.Tensor] = {}

        def block_output(i: int):
            def hook(block, args, output):
                if threading.get_ident() == caller:  # another thread's forward through the same model is its own
                    pooled[i] = pool(output[0] if isinstance(output, tuple) else output, attention_mask, pooling)
            return hook

        def embeddings(block, args):  # what block 0 is given
            if threading.get_ident() == caller:
                pooled[0] = pool(args[0], attention_mask, pooling)

        handles = [blocks[i - 1].register_forward_hook(block_output(i)) for i in wanted if 0 < i < n]
        if 0 in wanted:
            handles.append(blocks[0].register_forward_pre_hook(embeddings))
        try:
            last = self.encoder(input_ids=input_ids, attention_mask=encoder_mask).last_hidden_state
        finally:  # a failed batch (out of memory, retried in halves) must not leave hooks behind
            for handle in handles:
                handle.remove()
        pooled[n] = pool(last, attention_mask, pooling)
        return torch.cat([pooled[i % (n + 1)] for i in self.config.pool_layers], dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        pooled = self.embed(input_ids, attention_mask)
        with torch.autocast(pooled.device.type, enabled=False):  # the float32 head stays float32 under autocast
            logits = self.classifier(pooled.to(self.classifier.weight.dtype))
        loss = None
        if labels is not None:
            loss = nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
        return SequenceClassifierOutput(loss=loss, logits=logits)


EduClassifierConfig.register_for_auto_class()
EduClassifierForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
