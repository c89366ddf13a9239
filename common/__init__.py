"""The bottom layer every other package may use: distributed queries (``common.dist``), storage paths and
the cache root (``common.paths``), the precision policy (``common.precision``) and device moves
(``common.device``). It imports only torch and the standard library, never another package of this project.
"""
