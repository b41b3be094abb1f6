"""Weight layouts of the peers, each converted to and from dinokit's, which is the official one.

dinokit's module tree has the official key names (`cls_token`, `blocks.{i}.attn.qkv.weight`, ...), so the
official `*_pretrain.pth` layout needs no renaming; Hugging Face and timm files are renamed here.
"""
