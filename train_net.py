#!/usr/bin/env python
"""Train or evaluate HAR-Net (or any Detectron2 model) with Detectron2's trainer.

Examples (see README):

    # the CPU demo on the built-in dataset
    python train_net.py --config-file configs/HARNet/demo/har_R18_shapes_demo.yaml
    # 8 GPUs (NCCL), COCO from $DETECTRON2_DATASETS/coco
    python train_net.py --num-gpus 8 --config-file configs/HARNet/har_R_50_FPN_1x.yaml
    # two-step schedule, 2 CPU processes (gloo), a COCO-format dataset of your own
    python train_net.py --two-step --cpu-procs 2 --config-file CFG.yaml \\
        --register-coco mydata_train train.json images/ DATASETS.TRAIN "('mydata_train',)"
    # LazyConfig with key=value overrides
    python train_net.py --config-file configs/HARNet/demo/har_R18_shapes_demo.py \\
        train.max_iter=100 optimizer.lr=0.01
    # evaluate a checkpoint
    python train_net.py --eval-only --config-file CFG.yaml MODEL.WEIGHTS out/model_final.pth
"""
from harnet.engine import argument_parser, launch_from_args, main

if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    launch_from_args(main, args)
