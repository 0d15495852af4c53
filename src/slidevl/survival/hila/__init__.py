"""HiLa: prompt bank, optimal prompt learning, cross-level propagation, mutual contrastive learning."""
