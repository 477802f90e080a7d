using System.Text.Json;
using PaliGemma.CpuOnly.Tests.Cli;

namespace PaliGemma.CpuOnly.Tests.Lora;

/// <summary><c>paligemma generate --adapter DIR [--merge-adapter]</c>, run in-process.</summary>
[Collection(nameof(ConsoleCollection))]
public sealed class LoraCliTests
{
    public static TheoryData<string, bool> Modes() => new() { { "s1_caption", false }, { "s1_caption", true }, { "s2_vqa_jpeg", false }, { "s2_vqa_jpeg", true } };

    [Theory]
    [MemberData(nameof(Modes))]
    public void Generate_with_an_adapter_prints_the_adapter_reference_ids(string sampleName, bool merge)
    {
        var sample = LoraGoldenData.Sample(sampleName);
        string image = Path.Combine(LoraGoldenData.BaseDirectory, sample.GetProperty("images")[0].GetString()!);
        string[] args =
        [
            "generate", "--model", LoraGoldenData.BaseDirectory, "--image", image, "--prompt", sample.GetProperty("prompts")[0].GetString()!,
            "--max-new-tokens", LoraGoldenData.MaxNewTokens(sampleName).ToString(), "--json", "--quiet",
            "--adapter", LoraGoldenData.AdapterDirectory("lora"), .. (merge ? new[] { "--merge-adapter" } : []),
        ];
        var (code, stdout, stderr) = CliTests.Run(args);
        Assert.True(code == 0, $"exit {code}: {stderr}");
        using var doc = JsonDocument.Parse(stdout);
        Assert.Equal(sample.GetProperty("generated_ids_list")[0].EnumerateArray().Select(e => e.GetInt32()),
            doc.RootElement.GetProperty("generated_ids").EnumerateArray().Select(e => e.GetInt32()));
    }

    [Fact]
    public void Merge_without_an_adapter_is_a_usage_error_and_a_bad_adapter_names_the_field()
    {
        string image = Path.Combine(LoraGoldenData.BaseDirectory, "rgb_640x480.png");
        var (code, _, stderr) = CliTests.Run("generate", "--model", LoraGoldenData.BaseDirectory, "--image", image, "--prompt", "caption en", "--merge-adapter", "--quiet");
        Assert.Equal(2, code);
        Assert.Contains("--adapter", stderr);

        using var adapter = LoraGoldenData.CopyAdapter().EditConfig(c => c["use_dora"] = true);
        (code, var stdout, stderr) = CliTests.Run("generate", "--model", LoraGoldenData.BaseDirectory, "--image", image, "--prompt", "caption en",
            "--adapter", adapter.Directory, "--quiet");
        Assert.Equal(1, code);
        Assert.Equal("", stdout);
        Assert.Single(stderr.TrimEnd().Split('\n'));
        Assert.Contains("'use_dora'", stderr);
    }
}
