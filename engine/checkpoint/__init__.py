"""The on-disk checkpoint format shared by training and the converters: Megatron-LM's directory
layout with atomic publishing (`layout`) and the TP/PP sharding of mcore state dicts (`sharding`)."""
