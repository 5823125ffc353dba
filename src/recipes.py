"""The recipes: every setting of a run, as plain tables, one per stage.

A recipe has a table for the model and one for each training stage:
'pretrain', 'finetune_scratch' (finetuning without pretrained params) and
'finetune_pretrained'. Its 'variants' table changes single settings of a
stage for one variant. Two settings of a stage say where the cosine ends:
final_tokens = cosine_epochs x documents x cosine_width, the documents
being the pretraining corpus's; with cosine_epochs 'max_epochs' the cosine
ends with the run: the run's own epochs of its own training examples. The
device's choices (device_settings) come after the table, the command
line's overrides last.

Adding a recipe is adding an entry to RECIPES; adding a variant is adding an
entry to VARIANTS (its model's settings), and to a recipe's 'variants' where
it trains differently.
"""

BLOCK_SIZE = 128

# variant -> the model settings (model.GPTConfig keywords) that make it; the year of the assignment that had it
VARIANTS = {
    'vanilla': {},
    'synthesizer': {'synthesizer': True},  # 2021-22
    'perceiver': {'perceiver': True},      # 2022-23; its bottleneck_dim is a model setting of each recipe
    'rope': {'rope': True},                # 2023-24
}

# The perceiver's --bottleneck_dim default: the 2023 handout's commands give 64 (its starter code's own default
# is 32). Position i sees the text only through bottleneck positions 0..min(i, m - 1), which see inputs up to
# their own position: at 32, an answer character past position 31 (dev lines are 31-64 characters) sees the
# first 32 characters and itself, not the answer's earlier characters.
BOTTLENECK_DIM = 64

_SCHEDULE = dict(lr_decay=True, warmup_tokens=512 * 20, cosine_epochs=200, cosine_width=BLOCK_SIZE)

FAITHFUL = {
    'model': dict(n_layer=4, n_head=8, n_embd=256),
    'pretrain': dict(max_epochs=650, batch_size=128, learning_rate=6e-3, **_SCHEDULE),
    'finetune_scratch': dict(max_epochs=75, batch_size=256, learning_rate=6e-4, **_SCHEDULE),
    'finetune_pretrained': dict(max_epochs=10, batch_size=256, learning_rate=6e-4, **_SCHEDULE),
    'variants': {'perceiver': {'model': dict(bottleneck_dim=BOTTLENECK_DIM)},
                 'rope': {'pretrain': dict(cosine_epochs=650)}},
}
"""The original assignment's settings (2021 handout and starter code), each later variant's as its year had them.

Its cosine is fixed in tokens, 200 epochs of whole blocks of the
pretraining corpus, for every stage: a longer or shorter run leaves it as it is.
The perceiver's year (2023) kept all of it. RoPE's (2024) changed one
number: pretraining's cosine ends at 650 epochs, the run's length, instead
of reaching its floor at epoch 200 and rising again.
"""

FAITHFUL_2024 = dict(FAITHFUL, pretrain=dict(FAITHFUL['pretrain'], cosine_epochs=650))
"""The faithful recipe with the 2024 pretraining schedule for every variant: vanilla as that year ran it."""

_COSINE_WITH_THE_RUN = dict(cosine_epochs='max_epochs', cosine_width=BLOCK_SIZE - 1)

LAPTOP = {
    'model': dict(n_layer=4, n_head=4, n_embd=128, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0),
    'pretrain': dict(max_epochs=230, batch_size=128, learning_rate=6e-3, lr_decay=True,
                     warmup_tokens=100 * 128 * (BLOCK_SIZE - 1), cosine_epochs='max_epochs',
                     cosine_width=BLOCK_SIZE - 1, first_step_lr='scheduled', precision='auto', batching='stratified'),
    'finetune_scratch': dict(FAITHFUL['finetune_scratch'], precision='auto'),
    'finetune_pretrained': dict(FAITHFUL['finetune_pretrained'], precision='auto'),
    'variants': {'vanilla': {'pretrain': dict(max_epochs=150, optimizer='muon', lr_floor=0.0),
                             'finetune_pretrained': dict(_COSINE_WITH_THE_RUN, max_epochs=5)},
                 'synthesizer': {'pretrain': dict(max_epochs=320, batching='random')},
                 'perceiver': {'model': dict(bottleneck_dim=BOTTLENECK_DIM), 'pretrain': dict(max_epochs=230)},
                 'rope': {'pretrain': dict(max_epochs=230), 'finetune_pretrained': _COSINE_WITH_THE_RUN}},
}
"""A recipe sized for a 2-core CPU (EXPERIMENTS.md has the runs behind it).

A narrower, dropout-free model (width 128, 4 heads). Vanilla pretrains for
150 epochs with Muon (optim.py: orthogonalized momentum for the hidden
matrices, AdamW for the rest, at one rate) and a cosine falling to zero,
then finetunes for 5 epochs: it ends below AdamW's 230-epoch loss at 1.09x
the cost of a step and scored 12.8% dev against AdamW's 9.8% on the same
CPU. The others keep AdamW, whose cosine stops at 10% of the peak rate 80%
of the way through, as the original's: the synthesizer for 320 epochs (it
learns more slowly per step; with Muon it reached as low a loss or lower and scored
less), the perceiver and rope for 230. Each pretraining cosine ends with the run,
--max_epochs included. A warmup over 100 batches starts at the first
step: a first step at the full rate, as the original takes it, holds this
model's loss 0.1-0.3 higher over its first 1,000 steps. Pretraining
batches are stratified by length (batching.py), for 17% less CPU time at
equal loss; the synthesizer's stay random (its stratified seeds scored
3.8-4.0% dev, its random ones 4.6-6.4%). Weight decay stays the faithful
0.1; docs/recipes.md has every run behind these choices.
Finetuning is the faithful one, except that vanilla's and rope's cosine
ends with their run after pretraining: the faithful rate hardly falls in
80 steps, and the model it leaves depends on the order of its last
batches. On two pretrained vanilla models, three finetuning seeds each:
4.8-11.0% dev at the faithful rate, 9.8-12.0% with the cosine, each pair
in its favour (docs/recipes.md). The synthesizer and the perceiver, whose
finetuning loss stays at 0.37-0.80 at the faithful rate (vanilla's: 0.04),
scored lower with it and keep that rate.
"""

RECIPES = {'faithful': FAITHFUL, 'faithful-2024': FAITHFUL_2024, 'laptop': LAPTOP}
STAGES = ('pretrain', 'finetune_scratch', 'finetune_pretrained')


def device_settings(device):
    """How batches are run on `device`; the math stays as it is.

    On a CPU, no DataLoader workers (building a batch costs under 0.1% of a
    step and workers only compete for the cores, bench/data_loader.py) and
    each batch split into 4 length-sorted trimmed chunks (2.3x the reference
    step, bench/train_step.py); on a GPU the original's 4 workers, whole batches.
    """
    on_gpu = device.type == 'cuda'
    return dict(num_workers=4 if on_gpu else 0, chunks=1 if on_gpu else 4)


def stage_of(function, from_pretrained):
    """The stage a run.py function trains ('pretrain' or 'finetune'; None for 'evaluate')."""
    if function == 'finetune':
        return 'finetune_pretrained' if from_pretrained else 'finetune_scratch'
    return 'pretrain' if function == 'pretrain' else None


def stage_settings(recipe, variant, stage):
    """The settings of `stage` (and of 'model') in `recipe` for `variant`, as the tables give them."""
    return dict(RECIPES[recipe][stage], **RECIPES[recipe].get('variants', {}).get(variant, {}).get(stage, {}))


def settings(recipe, variant, stage, n_documents, device, max_epochs=None, n_examples=None):
    """(model settings, training settings) of `stage` in `recipe` for `variant`, on `device`.

    n_documents is the pretraining corpus's, which a fixed cosine counts;
    n_examples the stage's training examples (default n_documents, as in
    pretraining) and max_epochs the command line's, which a cosine that
    ends with the run counts.
    """
    model_settings = stage_settings(recipe, variant, 'model')
    train = stage_settings(recipe, variant, stage)
    epochs = train['max_epochs'] if max_epochs is None else max_epochs
    if train['cosine_epochs'] == 'max_epochs':
        cosine_tokens = epochs * (n_documents if n_examples is None else n_examples)
    else:
        cosine_tokens = train['cosine_epochs'] * n_documents
    train['final_tokens'] = cosine_tokens * train['cosine_width']
    del train['cosine_epochs'], train['cosine_width']
    return model_settings, dict(train, **device_settings(device))
