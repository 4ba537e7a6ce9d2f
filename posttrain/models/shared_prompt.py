"""One prompt and several replies in one row, the prompt computed once (prefix sharing).

DPO's chosen and rejected replies (posttrain.models.pairs) and GRPO/RLOO's K sampled responses
(posttrain.sampling.Generation.shared_prompt_rows) answer one prompt each. Laid out as a row
each, the prompt goes through every projection and MLP once per reply; here it goes through
once. Shape letters: N rows, S replies a row at most, T columns.

    tokens     x0 … x(P-1) | a0 … | p    b0 … | p    c0 … | pad …
    positions  0  … P-1    | P  … | P-1  P  … | P-1  P  … | 0 …
    sequence 0 x0 … x(P-1)   a0 …
    sequence 1 x0 … x(P-2)          p    b0 …
    sequence 2 x0 … x(P-2)                      p    c0 …

Each token attends to the earlier-or-same tokens of the first sequence holding it
(posttrain.models.attention.sequence_members' [N,S,T] form, which `decoder_hidden` and
TokenLogprobs read): reply k sees the prompt and itself, never another reply, and positions
continue from the prompt in every reply.

Why the copy p of the prompt's last token: every reply's first token is predicted from the
prompt's last hidden state, but in one row the token before b0 is the end of reply a. p stands
at position P-1 and attends to x0 … x(P-2) and itself, exactly the inputs x(P-1) had, so its
hidden state equals the prompt's last one and every reply token is predicted from the column
just before it (TokenLogprobs' contract: hidden[t-1] predicts token t). It costs one token a
reply after the first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SharedPromptRows:
    """N rows of one prompt and its replies each.

    input_ids: [N,T] long, pad_id after each row's last reply. members: [N,S,T] bool, True
    where column t is in the row's sequence s (prompt + reply s; all False for a row with fewer
    than S replies). position_ids: [N,T] long (0 at padding). reply_starts: N lists, the
    column of each reply's first token (a reply with no tokens starts where its p ended + 1).
    """

    input_ids: torch.Tensor
    members: torch.Tensor
    position_ids: torch.Tensor
    reply_starts: list[list[int]]


def shared_prompt_rows(groups: list[tuple[list[int], list[list[int]]]], pad_id: int) -> SharedPromptRows:
    """groups: N (prompt token ids, its replies' token ids) -> one row each, laid out as the
    module docstring draws. ValueError for an empty prompt or a group without replies."""
    for n, (prompt, replies) in enumerate(groups):
        if not prompt or not replies:
            raise ValueError(f"shared_prompt_rows: group {n} has an empty prompt or no replies")
    width = max(len(prompt) + sum(len(r) + 1 for r in replies) - 1 for prompt, replies in groups)
    most = max(len(replies) for _, replies in groups)
    input_ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(groups), width), dtype=torch.long)
    members = torch.zeros((len(groups), most, width), dtype=torch.bool)
    starts = []
    for row, (prompt, replies) in enumerate(groups):
        n_p, ids, pos, row_starts = len(prompt), list(prompt), list(range(len(prompt))), []
        members[row, :, :n_p - 1] = True  # x0 … x(P-2) is in every sequence (rows with fewer replies: below)
        members[row, len(replies):] = False
        members[row, 0, n_p - 1] = True
        for k, reply in enumerate(replies):
            if k:
                members[row, k, len(ids)] = True  # p
                ids.append(prompt[-1])
                pos.append(n_p - 1)
            row_starts.append(len(ids))
            members[row, k, len(ids): len(ids) + len(reply)] = True
            ids += reply
            pos += range(n_p, n_p + len(reply))
        input_ids[row, :len(ids)] = torch.tensor(ids)
        positions[row, :len(ids)] = torch.tensor(pos)
        starts.append(row_starts)
    return SharedPromptRows(input_ids, members, positions, starts)


__all__ = ["SharedPromptRows", "shared_prompt_rows"]
