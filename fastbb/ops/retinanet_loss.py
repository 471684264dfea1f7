# PLACEHOLDER until the batched loss lands: the model then runs torchvision's own loss.
pad_targets = retinanet_loss = None
