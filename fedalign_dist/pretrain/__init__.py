"""A small MoE language model pretrained here, on public text that no benchmark client holds,
so that federated fine-tuning starts from experts with roles (`fedalign-dist pretrain`)."""
