"""The tags lemo's rewrites put on the nodes they insert: the one contract between the passes that
write them (select, compact, loss) and everything that reads them (the post-grad fusion, the
recompute pass, explain, ONNX export).

A tag is `node.meta["custom"] = {"lemo": role, "lemo_layer": layer}`, plain strings and ints, so
that it survives the graph copies of AOTAutograd and Inductor, which carry `meta["custom"]` over
to the joint, forward, backward and post-grad graphs. `Role` names every role; nothing else writes
or parses the strings.
"""

from __future__ import annotations

import enum

from torch import fx


class Role(str, enum.Enum):
    """What an inserted node is for."""

    SCORE = "score"                         # the attention scorer's nodes (and their inputs' copies)
    MLP_SCORE = "mlp_score"                 # the MLP scorer's (mlp="tokens")
    SELECT = "select"                       # kept-token indices [B, K] of an attention block
    SELECT_KEPT = "select_kept"             # padded batches: which of those rows hold kept tokens
    SELECT_VALID = "select_valid"           # padded batches: which rows are real, not fillers
    MLP_SELECT = "mlp_select"               # the same three for an MLP block (mlp="tokens")
    MLP_SELECT_KEPT = "mlp_select_kept"
    MLP_SELECT_VALID = "mlp_select_valid"
    GATHER = "gather"                       # a compacted block's gathers of the kept rows
    HIDE_FILLERS = "hide_fillers"           # padded batches: fillers hidden as keys
    SCATTER_ADD = "scatter_add"             # the block's result added back into the residual
    PADDING = "padding"                     # the real-token mask a padded batch's selection reads
    MLP_CHANNELS = "mlp_channels"           # mlp="channels": the channel-sparse down projection
    SEGMENTED_LOSS = "segmented_loss"       # the segmented LM head + cross-entropy
    LOSS_SELECTION = "loss_selection"       # a checkpointed block's selection, passed out for the loss
    PLACEHOLDER = "placeholder"             # a NaN placeholder for an output lemo no longer computes


# The roles of the nodes that decide which rows a sparse block runs on.
SELECTIONS = frozenset({Role.SELECT, Role.SELECT_KEPT, Role.SELECT_VALID,
                        Role.MLP_SELECT, Role.MLP_SELECT_KEPT, Role.MLP_SELECT_VALID})
# The block ("attention" or "mlp") each selection role belongs to, and the padded-batch companions
# of each block's index selection.
BLOCK_OF_SELECTION = {
    Role.SELECT: "attention", Role.SELECT_KEPT: "attention", Role.SELECT_VALID: "attention",
    Role.MLP_SELECT: "mlp", Role.MLP_SELECT_KEPT: "mlp", Role.MLP_SELECT_VALID: "mlp",
}
KEPT_OF = {Role.SELECT: Role.SELECT_KEPT, Role.MLP_SELECT: Role.MLP_SELECT_KEPT}
SCORE_OF = {Role.SELECT: Role.SCORE, Role.MLP_SELECT: Role.MLP_SCORE}
VALID_OF = {Role.SELECT: Role.SELECT_VALID, Role.MLP_SELECT: Role.MLP_SELECT_VALID}


def tag(node: fx.Node, role: Role, layer: int | None = None) -> None:
    """Tag `node` with `role` (and the decoder layer it belongs to, when it belongs to one)."""
    node.meta["custom"] = {"lemo": role.value} if layer is None else {"lemo": role.value,
                                                                      "lemo_layer": layer}


def role_of(node: fx.Node) -> Role | None:
    """The role of a node lemo inserted; None for any other node."""
    value = (node.meta.get("custom") or {}).get("lemo")
    return None if value is None else Role(value)


def layer_of(node: fx.Node) -> int | None:
    """The decoder layer of a node lemo inserted for one; None otherwise."""
    return (node.meta.get("custom") or {}).get("lemo_layer")
