"""The recipes, shipped inside the package: ``--config pretrain:as-base`` names one."""
