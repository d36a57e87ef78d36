"""An engine's weights gathered on rank 0 for an export, whatever the layout: ZeRO-3 gathers
one parameter at a time, a pipeline stage sends each of its tensors to rank 0 in turn, tensor
parallel slices are joined (pipelines/train/tensor_parallel.py), LoRA adapters merged or kept
apart. `WeightExport` is a part of pipelines/train/engine.py's Engine (its plan, topology,
grid and DeepSpeed engine)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from model.gpt import GPT


class WeightExport:
    """The export side of Engine: every method is a collective unless it says otherwise."""

    def export_specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Name -> (dtype, shape) of every weight an export holds: GPT names, fp32, a tied head
        once (as the embedding). From the config alone, on the meta device."""
        with torch.device("meta"):
            model = GPT(self.plan.model)
        return {name: (torch.float32, tuple(param.shape)) for name, param in model.named_parameters()}

    def stream_weights(self, order: list[str]):
        """Each weight in `order` as an fp32 CPU tensor on rank 0 (None elsewhere), one at a time.

        A collective: every rank iterates it to the end, in the same order. Rank 0 never holds
        more than the tensor it is given (plus, unpipelined without ZeRO-3, the model it trained):
        ZeRO-3 gathers one parameter at a time; a pipeline stage sends each of its tensors to
        rank 0 when its turn comes."""
        rank = self.topology.rank
        if self.grid is not None:
            yield from self._stream_split(order)
        elif self.pipelined:
            yield from self._stream_from_stages(order)
        elif self.plan.deepspeed_zero_stage == 3:
            import deepspeed

            from model.lora import adapters, merged_weight

            params = dict(self.engine.module.named_parameters())
            adapted = {f"{name}.weight": module for name, module in adapters(self.engine.module).items()}
            for name in order:
                if name in adapted:  # the merged weight: W, A and B gathered together
                    module = adapted[name]
                    with deepspeed.zero.GatheredParameters([module.weight, module.lora_A, module.lora_B], modifier_rank=None):
                        yield merged_weight(module).cpu() if rank == 0 else None
                    continue
                with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=None):
                    yield params[name].detach().float().cpu() if rank == 0 else None  # written before the gather ends
        else:
            from model.lora import adapters, merged_weight

            params = dict(self.engine.module.named_parameters())
            adapted = {f"{name}.weight": module for name, module in adapters(self.engine.module).items()}
            for name in order:
                if rank != 0:
                    yield None
                elif name in adapted:  # the export holds the merged weight: W + (alpha / r) B A
                    yield merged_weight(adapted[name]).cpu()
                else:
                    yield params[name].detach().float().cpu()

    def adapter_weights(self) -> dict[str, torch.Tensor]:
        """Each adapter's A and B as fp32 CPU tensors, under the names the GPT has them
        (`transformer.h.0.attn.c_attn.lora_A`); empty without LoRA. A collective under ZeRO-3
        (each is gathered in turn; small), where every rank gets them, and in a pipeline (each
        stage sends its own to rank 0, which alone gets them); elsewhere they are whole."""
        if self.pipelined:
            return self._adapters_from_stages()
        out = {}
        for name, param in self.engine.module.named_parameters():
            if not name.endswith((".lora_A", ".lora_B")):
                continue
            if self.plan.deepspeed_zero_stage == 3:
                import deepspeed

                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    out[name] = param.detach().float().cpu()
            else:
                out[name] = param.detach().float().cpu()
        return out

    def _stream_split(self, order: list[str]):
        """Tensor parallel (with or without a pipeline): pipelines/train/tensor_parallel.py: stream_split."""
        from model.partition import layer_of
        from model.pipe import gpt_state_of_stage
        from pipelines.train.tensor_parallel import stream_split

        config, parts = self.plan.model, self.plan.stage_layers
        mine = {}
        if self.topology.dp_rank == 0:
            module = self.engine.module
            mine = gpt_state_of_stage(module, config) if self.pipelined else dict(module.named_parameters())

        def stage_of(name: str) -> int:
            layer = layer_of(config, name)
            return next(s for s in range(len(parts) - 1) if parts[s] <= layer < parts[s + 1]) if self.pipelined else 0

        yield from stream_split(mine, config, order, self.export_specs(), self.grid.topology(), stage_of, self.reduce_device)

    def _adapters_from_stages(self) -> dict[str, torch.Tensor]:
        from model.lora import adapted_names, projection_shape
        from model.pipe import gpt_key

        lora, config = self.plan.settings.lora, self.plan.model
        if lora is None:
            return {}
        specs = {}
        for name in adapted_names(config.n_layer, lora.targets):
            fan_in, fan_out = projection_shape(config, name.split(".", 3)[3])
            specs[f"{name}.lora_A"] = (torch.float32, (lora.rank, fan_in))
            specs[f"{name}.lora_B"] = (torch.float32, (fan_out, lora.rank))
        mine = {}
        if self.topology.dp_rank == 0:
            mine = {gpt_key(config, key): param for key, param in self.engine.module.named_parameters() if ".lora_" in key}
        received = self._send_to_rank_0(list(specs), specs, mine)
        return {name: tensor for name, tensor in zip(specs, received) if tensor is not None}

    def _stream_from_stages(self, order: list[str]):
        from model.pipe import gpt_state_of_stage

        mine = gpt_state_of_stage(self.engine.module, self.plan.model) if self.topology.dp_rank == 0 else {}
        yield from self._send_to_rank_0(order, self.export_specs(), mine)

    def _send_to_rank_0(self, order: list[str], specs: dict, mine: dict):
        """Each tensor named in `order` (GPT names: `layer_of` says which stage holds it), taken
        from `mine` on the data-parallel rank 0 of that stage, as an fp32 CPU tensor on rank 0
        (None elsewhere), in turn. A collective: every rank iterates it to the end."""
        from model.partition import layer_of

        config, rank = self.plan.model, self.topology.rank
        wire = self.reduce_device  # NCCL moves GPU tensors, gloo CPU ones
        parts = self.plan.stage_layers
        topo = self.engine.grid.topology()
        tensor_rank_0 = {"model": 0} if "model" in topo.get_axis_names() else {}
        for name in order:
            layer = layer_of(config, name)
            stage = next(s for s in range(len(parts) - 1) if parts[s] <= layer < parts[s + 1])
            owner = topo.get_rank(pipe=stage, data=0, **tensor_rank_0)
            if rank == owner:
                tensor = mine[name].detach().float()
                if rank == 0:
                    yield tensor.cpu()
                    continue
                dist.send(tensor.to(wire).contiguous(), dst=0)
            elif rank == 0:
                tensor = torch.empty(specs[name][1], dtype=torch.float32, device=wire)
                dist.recv(tensor, src=owner)
                yield tensor.cpu()
                continue
            yield None
