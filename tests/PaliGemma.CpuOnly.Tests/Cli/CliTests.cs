using PaliGemma.CpuOnly.Tensors;
using System.Text.Json;
using PaliGemma.CpuOnly.Tests.Golden;

namespace PaliGemma.CpuOnly.Tests.Cli;

[CollectionDefinition(nameof(ConsoleCollection), DisableParallelization = true)]
public sealed class ConsoleCollection;

/// <summary>The <c>paligemma</c> command run in-process with its console captured.</summary>
[Collection(nameof(ConsoleCollection))]
public sealed class CliTests
{
    internal static (int Code, string Out, string Err) Run(params string[] args)
    {
        var oldOut = Console.Out;
        var oldErr = Console.Error;
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        Console.SetOut(stdout);
        Console.SetError(stderr);
        try
        {
            int code = PaliGemma.Cli.Program.Main(args);
            return (code, stdout.ToString(), stderr.ToString());
        }
        finally
        {
            Console.SetOut(oldOut);
            Console.SetError(oldErr);
        }
    }

    public static TheoryData<string, string> SingleSamples()
    {
        var data = new TheoryData<string, string>();
        foreach (var s in GoldenData.Samples().Where(s => !s.IsSuffix && !s.IsBatch)) data.Add(s.Case, s.Name);
        return data;
    }

    [Theory]
    [MemberData(nameof(SingleSamples))]
    public void Generate_json_prints_the_golden_ids(string caseName, string sampleName) =>
        GenerateJsonMatchesGolden(GoldenData.Sample(caseName, sampleName));

    /// <summary>`generate --json` on one golden sample: prompt ids, generated ids, text and the timing fields.</summary>
    internal static void GenerateJsonMatchesGolden(GoldenSample sample)
    {
        string json = RunJson(sample, []);
        using var doc = JsonDocument.Parse(json);
        var root = doc.RootElement;
        Assert.Equal(sample.Json.GetProperty("generated_ids_list")[0].EnumerateArray().Select(e => e.GetInt32()),
            root.GetProperty("generated_ids").EnumerateArray().Select(e => e.GetInt32()));
        Assert.Equal(sample.Json.GetProperty("input_ids_list")[0].EnumerateArray().Select(e => e.GetInt32()),
            root.GetProperty("prompt_ids").EnumerateArray().Select(e => e.GetInt32()));
        Assert.Equal(sample.Json.GetProperty("generated_text")[0].GetString(), root.GetProperty("text").GetString());
        var timings = root.GetProperty("timings_ms");
        foreach (var key in new[] { "load", "preprocess", "vision", "prefill" }) Assert.True(timings.GetProperty(key).GetDouble() >= 0);
        Assert.Equal(sample.MaxNewTokens - 1, timings.GetProperty("decode_per_token").GetArrayLength());
    }

    private static string RunJson(GoldenSample sample, string[] extra)
    {
        var (code, stdout, stderr) = Run([
            "generate", "--model", sample.CaseDirectory, "--image", Path.Combine(sample.CaseDirectory, sample.Images[0]),
            "--prompt", sample.Prompts[0], "--max-new-tokens", sample.MaxNewTokens.ToString(), "--json", "--quiet", .. extra]);
        Assert.True(code == 0, $"exit {code}: {stderr}");
        return stdout;
    }

    [Fact]
    public void Plain_output_is_the_answer_text_and_logits_out_writes_steps_by_vocab()
    {
        var sample = GoldenData.Sample("tiny-mqa-56", "s1_caption");
        string npy = Path.Combine(Path.GetTempPath(), $"pg-logits-{Guid.NewGuid():N}.npy");
        try
        {
            var (code, stdout, _) = Run("generate", "--model", sample.CaseDirectory, "--image", Path.Combine(sample.CaseDirectory, sample.Images[0]),
                "--prompt", sample.Prompts[0], "--max-new-tokens", sample.MaxNewTokens.ToString(), "--quiet", "--logits-out", npy);
            Assert.Equal(0, code);
            Assert.Equal(sample.Json.GetProperty("generated_text")[0].GetString() + Environment.NewLine, stdout);
            var logits = Npy.Read(npy);
            Assert.Equal(new long[] { sample.MaxNewTokens, 2304 }, logits.Shape);
            Compare.Close("cli_step_logits", "--logits-out", logits.ToFloat32(), sample.Floats("step_logits"));
        }
        finally
        {
            File.Delete(npy);
        }
    }

    [Fact]
    public void Sampling_with_a_seed_is_reproducible()
    {
        var sample = GoldenData.Sample("tiny-mqa-56", "s1_caption");
        string[] args = ["--temperature", "0.8", "--top-k", "50", "--top-p", "0.9", "--seed", "7"];
        string a = JsonDocument.Parse(RunJson(sample, args)).RootElement.GetProperty("generated_ids").ToString();
        string b = JsonDocument.Parse(RunJson(sample, args)).RootElement.GetProperty("generated_ids").ToString();
        Assert.Equal(a, b);
    }

    [Theory]
    [InlineData("generate", "--image", "x.png", "--prompt", "p")]                 // missing --model
    [InlineData("generate", "--model", "m", "--image", "x.png", "--prompt", "p", "--bogus", "1")]
    [InlineData("generate", "--model", "m", "--image", "x.png", "--prompt", "p", "--max-new-tokens", "0")]
    [InlineData("generate", "--model", "m", "--image", "x.png", "--prompt", "p", "--top-p", "2")]
    [InlineData("frobnicate")]
    public void Bad_arguments_give_one_line_and_exit_code_2(params string[] args)
    {
        var (code, stdout, stderr) = Run(args);
        Assert.Equal(2, code);
        Assert.Equal("", stdout);
        Assert.Single(stderr.TrimEnd().Split('\n'));
        Assert.StartsWith("paligemma: ", stderr);
    }

    // Only rejected values: an accepted one would change the process-wide kernel choice under other tests.
    [Theory]
    [InlineData("--quant-prefill '4bit': expected int16, int8 or panels", "--quant-prefill", "4bit", "frobnicate")]
    [InlineData("--q8-prefill 'fp8': expected int16, int8 or panels", "--q8-prefill", "fp8", "frobnicate")]
    [InlineData("--quant-prefill needs int16, int8 or panels", "frobnicate", "--quant-prefill")]
    [InlineData("--quant-prefill is given twice", "--quant-prefill", "panels", "bench", "--q8-prefill", "int8")]
    public void The_prefill_kernel_option_takes_either_name_and_names_the_one_given_in_errors(string message, params string[] args)
    {
        var saved = PaliGemma.CpuOnly.Quant.QuantMatMul.PrefillKernel;
        var (code, _, stderr) = Run(args);
        Assert.Equal(2, code);
        Assert.Contains(message, stderr);
        Assert.Equal(saved, PaliGemma.CpuOnly.Quant.QuantMatMul.PrefillKernel);
    }

    [Fact]
    public void Missing_or_corrupt_files_give_one_line_naming_the_file_and_exit_code_1()
    {
        string golden = Path.Combine(TestPaths.Golden, "tiny-mqa-56");
        string image = Path.Combine(golden, "rgb_640x480.png");
        string dir = Path.Combine(Path.GetTempPath(), $"pg-cli-{Guid.NewGuid():N}");
        Directory.CreateDirectory(dir);
        try
        {
            AssertFails(["generate", "--model", Path.Combine(dir, "nope"), "--image", image, "--prompt", "caption en"], "nope");
            AssertFails(["generate", "--model", golden, "--image", Path.Combine(dir, "missing.png"), "--prompt", "caption en"], "missing.png");

            string notImage = Path.Combine(dir, "text.png");
            File.WriteAllText(notImage, "this is not an image");
            AssertFails(["generate", "--model", golden, "--image", notImage, "--prompt", "caption en"], "text.png");

            // A checkpoint whose safetensors file is cut short.
            string broken = Path.Combine(dir, "broken");
            Directory.CreateDirectory(broken);
            foreach (var f in new[] { "config.json", "tokenizer.model" }) File.Copy(Path.Combine(golden, f), Path.Combine(broken, f));
            byte[] weights = File.ReadAllBytes(Path.Combine(golden, "model.safetensors"));
            File.WriteAllBytes(Path.Combine(broken, "model.safetensors"), weights[..(weights.Length / 2)]);
            AssertFails(["generate", "--model", broken, "--image", image, "--prompt", "caption en"], "model.safetensors");
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    private static void AssertFails(string[] args, string mentioned)
    {
        var (code, stdout, stderr) = Run([.. args, "--quiet"]);
        Assert.Equal(1, code);
        Assert.Equal("", stdout);
        Assert.Single(stderr.TrimEnd().Split('\n'));
        Assert.Contains(mentioned, stderr);
    }
}
