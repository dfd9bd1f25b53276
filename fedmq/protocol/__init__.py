"""The wire protocol: what travels over MQTT and how it is checked.

The msgpack envelope and message schemas (``wire``), the topic tree (``topics``),
cutting bodies into chunks and putting them back together under a digest
(``chunking``), and reading a large update straight off disk without joining it
(``update_stream``). Pure data and validation: no sockets, no crypto keys, no torch.
"""
