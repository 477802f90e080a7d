using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Tasks;

namespace PaliGemma.Cli;

public static class Program
{
    public const string Usage = """
        paligemma: PaliGemma vision-language models on the CPU, pure managed .NET.

        Usage:
          paligemma generate --model DIR --image FILE --prompt TEXT [options]
          paligemma caption  --model DIR --image FILE [--lang en] [task options]
          paligemma answer   --model DIR --image FILE --question TEXT [--lang en] [task options]
          paligemma detect   --model DIR --image FILE --object "cat ; dog" [--annotate OUT.png] [task options]
          paligemma segment  --model DIR --image FILE --object "cat" --vae vae-oid.npz [--annotate OUT.png] [task options]
          paligemma ocr      --model DIR --image FILE [task options]
          paligemma decode-output --text RAW (--width W --height H | --annotate-image FILE --out OUT.png) [--vae FILE] [--json]
          paligemma batch    --model DIR --input FILE.jsonl [--output FILE.jsonl] [--vae FILE] [--max-new-tokens N] [--quiet]
          paligemma synth    --config FILE --out DIR [--dtype bf16|f32|f16|q8|nf4] [--seed N] [--shard-size 2GB] [--vocab-tokenizer FILE] [--force] [--quiet]
          paligemma serve    --model DIR [--urls http://127.0.0.1:8080] [--max-concurrency N] [--max-queue Q] [--max-request-bytes B] [--vae FILE] [--shutdown-timeout S] [--quiet]
          paligemma synth-adapter --model DIR --out DIR [--rank 8] [--alpha 16] [--targets q_proj,k_proj,...] [--seed N] [--dtype f32|bf16|f16] [--force] [--quiet]
          paligemma bench    --model DIR [--image FILE] [--prompt TEXT] [--new-tokens N] [--runs R] [--warmup W] [--threads T] [--probe-mb MB] [--tokenizer FILE] [--dtype q8|nf4]
                             [--adapter DIR [--merge-adapter | --compare-merged]] [--versus DIR[,DIR...]] [--profile] [--json] [--quiet]
          paligemma bench --cold-start --model DIR [--binary PATH] [--runs N] [--image FILE] [--prompt TEXT] [--tokenizer FILE] [--no-first-token] [--json] [--quiet]
          paligemma quantize --model DIR --to q8|nf4 --out DIR [--quiet]
          paligemma eval-quant --model DIR --image FILE (--dtype q8|nf4 | --quantized DIR) [--prompt TEXT] [--new-tokens N] [--tokenizer FILE]
          paligemma help | --help | --version

        generate options:
          --model DIR            Hugging Face PaliGemma checkpoint folder (config.json, safetensors, tokenizer.model)
          --image FILE           JPEG, PNG, BMP, GIF, WebP or TIFF image
          --prompt TEXT          e.g. "caption en", "answer en what is on the flower?", "detect bee"
          --max-new-tokens N     tokens to generate at most (default 64)
          --temperature T        0 = greedy (default); above 0 samples
          --top-k K              sample among the K most likely tokens (0 = off, default)
          --top-p P              sample within probability mass P (1 = off, default)
          --seed S               sampling seed (default 0)
          --tokenizer FILE       tokenizer.model to use instead of the one in the model folder
          --adapter DIR          PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors), applied at run time
          --merge-adapter        merge the --adapter into the weights at load instead (copies of the adapted matrices in the weights' dtype)
          --dtype q8|nf4         quantize the Linear weights at load (embedding / LM head: q8); quantized folders load as stored
          --json                 print one JSON object: text, ids and timings
          --logits-out FILE.npy  write every generated step's logits as float32 [steps, vocab]
          --quiet                no progress on stderr

        task options (caption, answer, detect, segment, ocr; greedy decoding):
          --lang CODE            answer language for caption/answer (default en)
          --object NAMES         detect/segment: one name, or several separated by ';' ("cat ; dog")
          --vae FILE             segment: the VQ-VAE mask decoder (vae-oid.npz), required
          --annotate OUT.png     detect/segment: write the image with boxes, masks and labels
          --max-new-tokens N     default 64 (128 for segment)
          --json                 one JSON object: text, objects, generated ids, timings
          --tokenizer FILE, --quiet as for generate
          Plain output is the answer text, or one line per object: label and pixel box (x1 y1 x2 y2).
          Boxes: normalized = token / 1023, pixels = normalized * original size (box_xyxy_div1024 gives the /1024 variant).
          Masks in JSON: COCO uncompressed RLE of the full-image mask, {"size": [h, w], "counts": [...]}, column-major,
          counts alternate 0s and 1s starting with 0s (pycocotools' frPyObjects reads it).

        batch input: one JSON object per line, image paths relative to the .jsonl file's folder:
          {"image": "a.jpg", "prompt": "caption en"}
          {"image": "a.jpg", "task": "detect", "objects": "cat ; dog"}     (or "objects": ["cat", "dog"])
          {"image": "a.jpg", "task": "answer", "question": "what is this?", "lang": "en"}
          tasks: caption, answer, detect, segment (needs --vae), ocr; optional "max_new_tokens".
          Writes one JSON result per line (stdout unless --output), progress on stderr; a bad line gets {"line", "error"}
          and the run goes on; exit code 1 when any line failed.

        serve answers HTTP: POST /v1/generate (multipart: image + prompt or task), POST /v1/chat/completions (OpenAI style,
        data: URL image), GET /healthz, GET /v1/models; see README "HTTP server". Without --urls it listens on $PORT (all
        interfaces) or 127.0.0.1:8080. Defaults: --max-concurrency 1, --max-queue 16 (more get 503 + Retry-After),
        --max-request-bytes 20971520, --shutdown-timeout 30 (seconds to finish in-flight requests on SIGTERM / Ctrl-C).

        synth writes a random-weight checkpoint (config.json copied, tokenizer.model, safetensors shards + index) for benchmarks;
        --dtype q8|nf4 writes the quantized layout of `quantize` directly, streaming.
        synth-adapter writes a random PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors) for the model's config:
        lora_A/lora_B for every dense layer the --targets select (default q,k,v,o,gate,up,down; as in PEFT, q/k/v also
        select SigLIP's attention), B non-zero so that the adapter changes outputs.
        bench times preprocess, vision, prefill and decode (medians over --runs; default 3 runs, 32 new tokens, greedy,
        never stopping at <eos>), the weight GB/s decode streams, peak RSS, bytes allocated per decode token and a
        memory read probe (--probe-mb, default 1024; 0 skips it) plus the same probe over the mapped weights decode reads.
        --profile adds where a decode step's time goes, per operation. bench --dtype q8|nf4 quantizes at load. --adapter DIR runs
        with a LoRA adapter at run time (or merged at load with --merge-adapter) and adds the adapter's size and the resident
        memory it added; --compare-merged also loads the merged model and alternates its decode steps with the run-time
        adapter's, for a ratio that holds on a busy machine. --versus DIR[,DIR...] also loads those checkpoints (e.g. the
        q8 and nf4 copies of --model) and runs every model's vision pass, prefill and decode steps in turn, rotating the
        order: medians per model and each one's speed-up over --model, measured under the same load and bandwidth.
        bench --cold-start starts --binary (default: this paligemma) --runs times (default 5); each process loads the model,
        computes the first greedy token and exits. Medians of process start -> model ready, start -> first token and peak RSS.
        quantize writes one model.safetensors with q8 or nf4 blocks (see README, "Quantized weights"), copies config.json and
        the tokenizer; the result loads memory-mapped. eval-quant compares a quantized model with the float one.
        --quant-scales search|absmax: each block's least-error scale of 16 candidates (quantize's default) or its absmax
        (the default of --dtype on generate/bench/eval-quant: loads several times faster, less accurate; search gives what
        quantize writes).
        Any command: --quant-prefill int16|int8|panels picks the kernel for many-token q8 and nf4 products (prefill, vision):
        int16 (default) or int8 quantized activations on integer multiply-adds, or fp32 activations on dequantized panels
        (--q8-prefill, its older name, is still accepted).
        """;

    public static int Main(string[] args)
    {
        try
        {
            if (args.Length == 0 || args[0] is "help" or "--help" or "-h" || (args.Length == 2 && args[1] is "--help" or "-h"))
            {
                Console.Out.WriteLine(Usage);
                return args.Length == 0 ? 2 : 0;
            }
            if (args[0] == "--version")
            {
                Console.Out.WriteLine($"paligemma {typeof(Program).Assembly.GetName().Version} ({PaliGemma.CpuOnly.Kernels.KernelInfo.VectorWidth}, {Environment.ProcessorCount} threads, " +
                                      $"{(System.Runtime.CompilerServices.RuntimeFeature.IsDynamicCodeSupported ? "JIT" : "NativeAOT")})");
                return 0;
            }
            args = TakeQuantPrefillOption(args);
            return args[0] switch
            {
                "generate" => GenerateCommand.Run(args[1..]),
                "caption" => TaskCommand.Run(PaliGemmaTask.Caption, args[1..]),
                "answer" => TaskCommand.Run(PaliGemmaTask.Answer, args[1..]),
                "detect" => TaskCommand.Run(PaliGemmaTask.Detect, args[1..]),
                "segment" => TaskCommand.Run(PaliGemmaTask.Segment, args[1..]),
                "ocr" => TaskCommand.Run(PaliGemmaTask.Ocr, args[1..]),
                "decode-output" => DecodeOutputCommand.Run(args[1..]),
                "batch" => BatchCommand.Run(args[1..]),
                "synth" => SynthCommand.Run(args[1..]),
                "bench" => args.Contains("--cold-start") ? ColdStartCommand.Run(args[1..]) : BenchCommand.Run(args[1..]),
                "serve" => Serve.ServeCommand.Run(args[1..]),
                ColdStartCommand.ProbeCommand => ColdStartCommand.Probe(args[1..]),
                "quantize" => QuantizeCommand.Run(args[1..]),
                "eval-quant" => EvalQuantCommand.Run(args[1..]),
                "synth-adapter" => SynthAdapterCommand.Run(args[1..]),
                _ => throw new UsageException($"unknown command '{args[0]}'"),
            };
        }
        catch (UsageException e)
        {
            Console.Error.WriteLine($"paligemma: {e.Message} (see 'paligemma help')");
            return 2;
        }
        catch (Exception e) when (e is IOException or InvalidDataException or UnauthorizedAccessException or ArgumentException
                                   or InvalidOperationException or NotSupportedException or OperationCanceledException)
        {
            Console.Error.WriteLine($"paligemma: {e.Message}");
            return 1;
        }
        catch (OutOfMemoryException)
        {
            Console.Error.WriteLine("paligemma: out of memory (try a smaller --max-new-tokens or a quantized model)");
            return 1;
        }
    }

    /// <summary>
    /// Applies and removes <c>--quant-prefill int16|int8|panels</c> (or its older name <c>--q8-prefill</c>, from before nf4
    /// took the same kernels): a process-wide kernel choice, so every command takes it.
    /// </summary>
    private static string[] TakeQuantPrefillOption(string[] args)
    {
        int at = Array.FindIndex(args, a => a is "--quant-prefill" or "--q8-prefill");
        if (at < 0)
            return args;
        string option = args[at];
        if (Array.FindIndex(args, at + 1, a => a is "--quant-prefill" or "--q8-prefill") >= 0)
            throw new UsageException($"{option} is given twice (--q8-prefill is the older name of --quant-prefill)");
        if (at + 1 >= args.Length)
            throw new UsageException($"{option} needs int16, int8 or panels");
        PaliGemma.CpuOnly.Quant.QuantMatMul.PrefillKernel = args[at + 1] switch
        {
            "int16" => PaliGemma.CpuOnly.Quant.QuantPrefillKernel.Int16Activations,
            "int8" => PaliGemma.CpuOnly.Quant.QuantPrefillKernel.Int8Activations,
            "panels" => PaliGemma.CpuOnly.Quant.QuantPrefillKernel.DequantizedPanels,
            _ => throw new UsageException($"{option} '{args[at + 1]}': expected int16, int8 or panels"),
        };
        string[] rest = [.. args[..at], .. args[(at + 2)..]];
        return rest.Length > 0 ? rest : throw new UsageException("no command given");
    }
}
