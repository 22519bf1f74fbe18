import sys

from resnet_imagenet.cli import main

sys.exit(main())
