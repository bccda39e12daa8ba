"""Pipeline point-to-point messages that reach the right peer buffer with two interleaved stages.

With `--num-layers-per-virtual-pipeline-stage` and two pipeline ranks, each rank's previous and next stage
are the same peer, so a step can send an activation and a gradient to it and receive both from it. The
backend matches same-peer messages in posting order. megatron-core posts its tensors unbatched in
rank-parity order for this case (`batch_p2p_comm=False`, engine/model/provider.py), but posts the shapes
that precede them under `variable_seq_lengths` in one fixed order on both ranks (send prev, recv prev,
send next, recv next): rank A's gradient shape lands in rank B's activation-shape buffer. Padded
micro-batches of equal length hide it; packed rows of different lengths abort the run (gloo: "Received
data size doesn't match expected size"). `ParityOrderedP2PCommunicator` sends the shapes in the same
rank-parity order as the tensors.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator, _p2p_ops
from megatron.core.process_groups_config import ProcessGroupCollection

from engine.platform import current_device

_SCHEDULE_GROUPS = ["tp", "cp", "embd", "pos_embd", "pp", "dp_cp"]
"""The groups megatron's interleaved schedule reads from a `pg_collection` handed to it."""


class ParityOrderedP2PCommunicator(P2PCommunicator):
    """megatron's communicator, with the shapes posted like the tensors when p2p is unbatched."""

    def _communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
        if self.config.batch_p2p_comm or self.config.use_ring_exchange_p2p:
            return super()._communicate_shapes(tensor_send_next, tensor_send_prev, recv_prev, recv_next)

        def shape_of(tensor):
            return None if tensor is None else torch.tensor(tensor.size(), device=current_device(), dtype=torch.int64)

        def buffer(wanted: bool):
            return torch.empty(3, device=current_device(), dtype=torch.int64) if wanted else None

        recv_prev_shape, recv_next_shape = buffer(recv_prev), buffer(recv_next)
        requests = _p2p_ops(tensor_send_prev=shape_of(tensor_send_prev), tensor_recv_prev=recv_prev_shape,
                            tensor_send_next=shape_of(tensor_send_next), tensor_recv_next=recv_next_shape,
                            group=self.pp_group, prev_pipeline_rank=self.prev_rank,
                            next_pipeline_rank=self.next_rank)
        for request in requests.values():
            request.wait()
        return tuple([0, 0, 0] if shape is None else shape.tolist() for shape in (recv_prev_shape, recv_next_shape))


def schedule_communication(model: list[torch.nn.Module]) -> dict:
    """Keyword arguments for megatron's `forward_backward_func`: the parity-ordered communicator (with the
    process groups megatron would otherwise collect itself) wherever shapes travel unbatched between
    interleaved stages; nothing otherwise, leaving megatron's defaults."""
    config = model[0].config
    if len(model) == 1 or config.batch_p2p_comm or not config.variable_seq_lengths:
        return {}
    return {"p2p_communicator": ParityOrderedP2PCommunicator(parallel_state.get_pipeline_model_parallel_group(),
                                                             config),
            "pg_collection": ProcessGroupCollection.use_mpu_process_groups(_SCHEDULE_GROUPS)}
