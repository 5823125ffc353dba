"""The metrics file's writer: a JSON line per record, held while its loss is not yet known on this host."""
import json


class MetricsLog:
    """Writes metrics records to `file` (None: writes nothing, still checks).

    A step's loss is a float, written at once, or a pending value that the
    training step made: device tensors (gpu_path.FixedShapeStep) or this
    process's share of a data-parallel loss (steps.EagerStep). Pending
    records are held until `flush`, which turns all their losses into floats
    at once with the step's `resolve` (one host sync, or one all-reduce):
    each a float, or a dict of the values to check, 'loss' among them (the
    fixed step's also holds its 'gradient norm', and the 'learning rate' it
    ran at, for the message). Each record goes to
    `check(record, values)` (which may raise) before its line is written, so
    a diverged step's line, and those held after it, are not written.
    """

    def __init__(self, file, resolve, check):
        self.file, self.resolve, self.check = file, resolve, check
        self.held = []

    def write(self, record):
        if 'loss' in record and not isinstance(record['loss'], float):
            self.held.append(record)
        elif self.file:
            self.file.write(json.dumps(record) + '\n')

    def flush(self):
        """Write the held records, their losses resolved; returns the last one (None when none were held)."""
        held, self.held = self.held, []
        resolved = self.resolve([record['loss'] for record in held]) if held else []
        record = None
        for record, values in zip(held, resolved):
            values = values if isinstance(values, dict) else {'loss': values}
            record = dict(record, loss=values['loss'])
            self.check(record, values)
            self.write(record)
        return record

    def close(self, flush=True):
        try:
            if flush:
                self.flush()
        finally:
            if self.file:
                self.file.close()
