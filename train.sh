#!/usr/bin/env bash
# ./train.sh GPUS NET OTHER [flags...]   e.g. ./train.sh 0,1,2,3 resnet_50 resnet_50_
echo "train.sh: not yet implemented (see the training issue)" >&2
exit 2
