"""The sequential baseline: `width` independent samples per prompt, each decoded in one engine request."""

from __future__ import annotations

from treepo.client.schema import FinishReason, SamplingParams, TreeParams
from treepo.service.engine.protocol import Engine, GenerateOutput, generate_all
from treepo.service.sampler.paths import TreeBuilder, make_request
from treepo.service.sampler.rules import StopRules, extract_last_boxed


def trajectory_reason(output: GenerateOutput, rules: StopRules, decode_text: str) -> FinishReason:
    """A whole trajectory's reason: the answer rule on its text, else EOS, else length (no early stops)."""
    has_eos = bool(output.output_ids) and output.output_ids[-1] in rules.stop_ids
    boxed = rules.answer_stop != "none" and extract_last_boxed(decode_text) is not None
    if boxed and (has_eos or rules.answer_stop == "boxed"):
        return "answer"
    return "eos" if has_eos else "max_tokens"


async def sample_independent(
    engine: Engine,
    builder: TreeBuilder,
    tree: TreeParams,
    sampling: SamplingParams,
    *,
    base_seed: int,
) -> None:
    """All `width` trajectories in flight at once, one request each; stored as chains of l-token nodes."""
    requests = [
        make_request(
            sampling,
            list(builder.prompt_ids),
            builder.rules.max_new_tokens,
            base_seed,
            f"seq-{index}",
            builder.priority,
        )
        for index in range(tree.width)
    ]
    builder.num_requests += len(requests)
    outputs = await generate_all(engine, requests)
    for index, output in enumerate(outputs):
        reason = trajectory_reason(output, builder.rules, builder.decode(list(output.output_ids)))
        builder.add_chain(index, output, tree.segment_tokens, reason)
