using System.Text.Json;
using PaliGemma.CpuOnly.Tests.Cli;

namespace PaliGemma.CpuOnly.Tests.GoldenPg2;

/// <summary><c>paligemma generate</c> on a PaliGemma 2 checkpoint: the decoder is chosen from config.json, no flag.</summary>
[Collection(nameof(ConsoleCollection))]
public sealed class Pg2CliTests
{
    public static TheoryData<string, string> SingleSamples()
    {
        var data = new TheoryData<string, string>();
        foreach (var s in Pg2Golden.Samples().Where(s => !s.IsSuffix && !s.IsBatch)) data.Add(s.Case, s.Name);
        return data;
    }

    [Theory]
    [MemberData(nameof(SingleSamples))]
    public void Generate_json_prints_the_golden_ids(string caseName, string sampleName)
    {
        var sample = Pg2Golden.Sample(caseName, sampleName);
        var (code, stdout, stderr) = CliTests.Run(
            "generate", "--model", sample.CaseDirectory, "--image", Path.Combine(sample.CaseDirectory, sample.Images[0]),
            "--prompt", sample.Prompts[0], "--max-new-tokens", sample.MaxNewTokens.ToString(), "--json", "--quiet");
        Assert.True(code == 0, $"exit {code}: {stderr}");
        using var doc = JsonDocument.Parse(stdout);
        var root = doc.RootElement;
        Assert.Equal(sample.Json.GetProperty("generated_ids_list")[0].EnumerateArray().Select(e => e.GetInt32()),
            root.GetProperty("generated_ids").EnumerateArray().Select(e => e.GetInt32()));
        Assert.Equal(sample.Json.GetProperty("input_ids_list")[0].EnumerateArray().Select(e => e.GetInt32()),
            root.GetProperty("prompt_ids").EnumerateArray().Select(e => e.GetInt32()));
        Assert.Equal(sample.Json.GetProperty("generated_text")[0].GetString(), root.GetProperty("text").GetString());
        Assert.Equal(sample.MaxNewTokens - 1, root.GetProperty("timings_ms").GetProperty("decode_per_token").GetArrayLength());
    }
}
