"""`lesion validate --compile`: every kind of spec checked against its loaded model, with no forward pass.

    lesion validate recipes/edit/edit_eiffel.yaml --compile
    ok: edit spec, 1 request(s), rome at layer 12 of 30 in smollm2-135m

What is checked, by kind:
- trace / patch (language models and VLMs): the whole plan compiles (sites, layers, positions, target
  tokens; a VLM's images load and pass its vision tower);
- edit: the layer(s) exist, each request's prompt takes its subject, each answer tokenizes, the
  corpus files exist (as every file a spec names: `recipes.jobs.flag_checks.check_spec_files`);
- steer: the layers exist, the prompts and the lexicon tokenize; a feature's dictionary fits;
- apply: each delta loads, passes its integrity checks and fits this base model (the weights are
  read, never written); the steering vector fits the model;
- VLM edit: the images load, the layer exists, the answers tokenize;
- text-to-image trace / erase / apply: the text-encoder layers exist, the concepts are in the
  tokenizer's vocabulary, the deltas fit the pipeline;
- lens / knockout / probe (language models and VLMs): the layers exist, every prompt (and image)
  prepares, its targets tokenize and its named positions exist; the tuned lens fits the model;
  knockout's model family takes the attention-scores site;
- daam: the layers exist and every word is a word of its prompt within the tokenizer's length.

A failed check raises `SpecError` (or `DeltaError`) naming the field.
"""

from __future__ import annotations

from interventions.core.errors import SpecError


def _layer_count(model) -> int:
    from interventions.models.sites import site_table

    return site_table(model).num_layers(model)


def _check_layers(field: str, layers, n: int) -> None:
    for i, layer in enumerate(layers):
        if not 0 <= layer < n:
            raise SpecError(f"{field}[{i}]" if len(layers) > 1 else field, layer,
                            f"a layer from 0 to {n - 1} (the model has {n})")


def _check_tokens(tokenizer, field: str, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or (unk is not None and unk in ids):
        raise SpecError(field, text, "text the model's tokenizer can encode (it gives no tokens, or unknown ones)")


def check_grid(spec) -> str:
    """Trace / patch, on a language model or a VLM: the whole plan compiles. For a VLM that loads its
    images and runs its vision tower (the image features are part of the prompts' embeddings)."""
    from interventions import compile_spec
    from interventions.api import load_for

    model, tokenizer, processor = load_for(spec.modality, spec.model)
    plan = compile_spec(spec, model, tokenizer, processor=processor)
    return (f"{len(spec.prompts)} prompt(s), compiles to {len(plan.graphs)} graph(s) and {plan.num_rows} rows in "
            f"{len(plan.chunks)} chunk(s)")


def check_edit(spec) -> str:
    from editors.methods.rome import EditRequest
    from editors.requests import resolve_requests
    from interventions import load_model
    from interventions.spec import ONE_LAYER_METHODS

    spec = resolve_requests(spec)
    model, tokenizer = load_model(spec.model)
    n = _layer_count(model)
    one = spec.method in ONE_LAYER_METHODS
    if (spec.layer if one else spec.layers) != "auto":
        _check_layers("layer" if one else "layers", spec.edit_layers, n)
    if spec.sequential is not None:
        from editors.sequential import ScaleProbe

        ScaleProbe.from_spec(spec)
    for i, r in enumerate(spec.requests):
        EditRequest(r.prompt, r.subject, r.target_new, r.target_true)
        for name in ("target_new", "target_true"):
            _check_tokens(tokenizer, f"requests[{i}].{name}", getattr(r, name))
    where = f"layer {spec.layer}" if one else f"layers {spec.layers}"
    batches = f", sequential in batches of {spec.sequential.batch_size}" if spec.sequential else ""
    return f"{len(spec.requests)} request(s), {spec.method} at {where} of {n} in {spec.model}{batches}"


def check_steer(spec) -> str:
    from interventions import load_model

    model, tokenizer = load_model(spec.model)
    n = _layer_count(model)
    _check_layers("layers", list(spec.layers), n)
    for i, word in enumerate(spec.lexicon):
        _check_tokens(tokenizer, f"lexicon[{i}]", word)
    from recipes.jobs.run_steer import steer_dictionary

    steer_dictionary(spec, model)          # `method: feature`: the dictionary fits the model, layer and site
    return f"{len(spec.prompts)} prompt(s), layers {list(spec.layers)} of {n} in {spec.model}"


def _check_deltas(model, paths) -> None:
    from editors.delta import load_delta, verify

    for path in paths:
        verify(model, load_delta(path))


def check_apply(spec) -> str:
    from interventions import load_model
    from interventions.lenses.steering import check_vector, load_vector

    model, _ = load_model(spec.model)
    _check_deltas(model, spec.deltas)
    if spec.steer is not None:
        check_vector(model, load_vector(spec.steer), (spec.coef,))
    return f"{len(spec.deltas)} delta(s) fit {spec.model}" + (", and the steering vector" if spec.steer else "")


def check_vlm_edit(spec) -> str:
    from interventions.modalities.vision_language.llava import load_image, load_vlm

    vlm, tokenizer, processor = load_vlm(spec.model)
    n = _layer_count(vlm)
    if spec.layer != "auto":
        _check_layers("layer", [spec.layer], n)
    load_image(spec.image, vlm, processor, field="image")
    for i, image in enumerate(spec.other_images):
        load_image(image, vlm, processor, field=f"other_images[{i}]")
    _check_tokens(tokenizer, "target_new", spec.target_new)
    return f"rome at layer {spec.layer} of {n} in {spec.model}, image {spec.image}"


def _pipeline(spec):
    from interventions.modalities.text_to_image.pipeline import load_pipeline

    return load_pipeline(spec.model)


def _text_layers(pipe) -> int:
    return pipe.text_encoder.config.num_hidden_layers


def check_diffusion_trace(spec) -> str:
    pipe = _pipeline(spec)
    if spec.layers != "all":
        _check_layers("layers", list(spec.layers), _text_layers(pipe))
    for i, p in enumerate(spec.prompts):
        _check_tokens(pipe.tokenizer, f"prompts[{i}].prompt", p.prompt)
    return f"{len(spec.prompts)} prompt(s) on {spec.model}"


def check_erase(spec) -> str:
    pipe = _pipeline(spec)
    if isinstance(spec.layer, int):
        _check_layers("layer", [spec.layer], _text_layers(pipe))
    for i, c in enumerate(spec.concepts):
        _check_tokens(pipe.tokenizer, f"concepts[{i}].concept", c.concept)
        if c.guide:
            _check_tokens(pipe.tokenizer, f"concepts[{i}].guide", c.guide)
    for i, word in enumerate(spec.preserve):
        _check_tokens(pipe.tokenizer, f"preserve[{i}]", word)
    from recipes.jobs.run_text_to_image import check_judged_concepts

    check_judged_concepts(spec, pipe)
    return f"{len(spec.concepts)} concept(s) in {spec.model}"


def check_diffusion_apply(spec) -> str:
    pipe = _pipeline(spec)
    _check_deltas(pipe, spec.deltas)
    return f"{len(spec.deltas)} delta(s) fit {spec.model}"


def check_features(spec) -> str:
    """features: the dictionary loads and fits the model; the layer exists; the examples tokenize (and their
    images load)."""
    from interventions.api import load_for
    from interventions.features.readout import read_examples, spec_units

    model, tokenizer, processor = load_for(spec.modality, spec.model)
    d, layer = spec_units(spec, model)
    read_examples(spec, model, tokenizer, processor)
    return f"{len(spec.examples)} example(s), layer {layer}" + (f", {d.d_sae} features" if d else ", neurons only")


def check_reading(spec) -> str:
    """lens / knockout / probe: layers, prompts (images loaded), targets, named positions."""
    from interventions.api import engine_model, load_for
    from interventions.engine.plan import resolve_layers
    from interventions.lenses.lens import lens_columns, load_tuned_lens, readings

    model, tokenizer, processor = load_for(spec.modality, spec.model)
    model, tokenizer = engine_model(spec, model, tokenizer)
    n = _layer_count(model)
    resolve_layers(spec, n)
    if spec.kind == "probe":
        from interventions.lenses.probe import example_readings

        example_readings(spec, model, tokenizer, processor)
        return f"{len(spec.examples)} example(s), {len({e.label for e in spec.examples})} labels, {n} layers"
    prompts = readings(spec, model, tokenizer, processor)
    if spec.kind == "knockout":
        from interventions.lenses.knockout import attention_modules, knockout_targets

        attention_modules(model)
        knockout_targets(spec, prompts)
    else:
        for r in prompts:
            lens_columns(spec, r)
    if getattr(spec, "tuned", None):
        load_tuned_lens(spec.tuned, model)
    return f"{len(prompts)} prompt(s), {n} layers"


def check_daam(spec) -> str:
    from interventions.modalities.text_to_image.daam import word_tokens
    from interventions.modalities.text_to_image.pipeline import cross_attention_layers

    pipe = _pipeline(spec)
    n = len(cross_attention_layers(pipe.unet))
    if spec.layers != "all":
        _check_layers("layers", spec.layers, n)
    for i, prompt in enumerate(spec.prompts):
        for word in spec.words or prompt.split():
            word_tokens(pipe, prompt, word, f"words (prompts[{i}])")
    return f"{len(spec.prompts)} prompt(s), {n} cross-attention layers"


def check_decompose(spec) -> str:
    """decompose: the model loads, the images load, the text bank encodes, the questions' classes embed."""
    from interventions.api import load_for
    from interventions.modalities.contrastive.heads import bank_of, images_of, questions_of

    clip, tokenizer, processor = load_for(spec.modality, spec.model)
    pixels, _ = images_of(spec, clip.config.vision_config.image_size, processor)
    bank = bank_of(spec, tokenizer)
    return f"{len(pixels)} image(s), {len(bank)} texts, {len(questions_of(spec))} question(s)"
