"""Modeling file shipped in every merged `dreamprm export` folder as modeling_dreamprm.py.

It lets plain transformers load the PRM with its trained head:

    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    logits = model(input_ids=ids, attention_mask=mask).logits        # [B, S, 2]
    probs = model.step_scores(ids, mask)                               # P(step correct) at each step tag

dreamprm itself never imports this module; export copies its text, with the import line of
the backbone classes rewritten for backbones other than Qwen2. Keep it free of dreamprm
imports: the folder must load where dreamprm is not installed.
"""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import TokenClassifierOutput
from transformers import Qwen2Config as BackboneConfig, Qwen2Model as Backbone  # dreamprm: backbone line


class DreamPRMForProcessReward(PreTrainedModel):
    """Backbone (keys model.*) + the 2-class head (score.0, ReLU, score.2) at every position."""

    config_class = BackboneConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = getattr(Backbone, "_no_split_modules", None)

    def __init__(self, config):
        super().__init__(config)
        self.model = Backbone(config)
        h = config.hidden_size
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 2))
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        """logits [B, S, 2]; softmax(logits)[..., 1] is P(step correct), read at the step tags."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=False)
        h = out.last_hidden_state
        return TokenClassifierOutput(logits=self.score(h.to(self.score[0].weight.dtype)).float())

    @torch.no_grad()
    def step_scores(self, input_ids, attention_mask=None) -> list:
        """P(step correct) at every step-tag token (config.dreamprm_step_tag_id), one list per row."""
        probs = self(input_ids=input_ids, attention_mask=attention_mask).logits.softmax(-1)[..., 1]
        tags = input_ids == self.config.dreamprm_step_tag_id
        return [p[t].tolist() for p, t in zip(probs, tags)]
