"""Disaggregated prefill/decode: a prompt's KV computed on a prefill instance, moved block by block to a
decode instance that generates the rest (DistServe, Splitwise). blocks.py: what a block is in bytes;
transport.py: how its bytes travel; prefill.py and decode.py: the two instances' sides."""
