using PaliGemma.CpuOnly.Model;

namespace PaliGemma.Cli;

public static class Program
{
    public const string Usage = """
        paligemma: PaliGemma vision-language models on the CPU, pure managed .NET.

        Usage:
          paligemma generate --model DIR --image FILE --prompt TEXT [options]

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
          --merge-adapter        merge the --adapter into the weights at load instead (fp32 copies of the adapted matrices)
          --json                 print one JSON object: text, ids and timings
          --logits-out FILE.npy  write every generated step's logits as float32 [steps, vocab]
          --quiet                no progress on stderr

          paligemma help | --help | --version
        """;

    public static int Main(string[] args)
    {
        try
        {
            if (args.Length == 0 || args[0] is "help" or "--help" or "-h")
            {
                Console.Out.WriteLine(Usage);
                return args.Length == 0 ? 2 : 0;
            }
            if (args[0] == "--version")
            {
                Console.Out.WriteLine($"paligemma {typeof(Program).Assembly.GetName().Version}");
                return 0;
            }
            return args[0] switch
            {
                "generate" => GenerateCommand.Run(args[1..]),
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
}
