using System.Text.Json;
using PaliGemma.CpuOnly.Model.Text;

namespace PaliGemma.CpuOnly.Tests.Text;

/// <summary>The golden model cases' prompts, suffix, padding and generated text, rebuilt with the tokenizer.</summary>
public sealed class PromptGoldenTests
{
    public static TheoryData<string> ModelCases()
    {
        var data = new TheoryData<string>();
        foreach (string name in TextGolden.ModelCases())
        {
            data.Add(name);
        }

        return data;
    }

    [Theory]
    [MemberData(nameof(ModelCases))]
    public void BuildPrompt_EveryGoldenSample_BuildsGoldenInputIds(string caseName)
    {
        (string directory, JsonDocument cases, int numImageTokens) = LoadCase(caseName);
        using (cases)
        {
            int checkedSamples = 0;
            foreach (JsonElement sample in Samples(cases))
            {
                if (!sample.TryGetProperty("input_ids_list", out JsonElement expectedList))
                {
                    continue;
                }

                string[] prompts = TextGolden.Strings(sample.GetProperty("prompts"));
                int[][] built = prompts.Select(p => TextGolden.Tokenizer.BuildPrompt(p, numImageTokens)).ToArray();
                int[][] expected = expectedList.EnumerateArray().Select(TextGolden.Ints).ToArray();
                if (IsBatch(sample))
                {
                    // A batch's input_ids_list rows are already left-padded to a common length.
                    (int[,] padded, _) = PaliGemmaTokenizer.PadLeft(built, TextGolden.Tokenizer.PadId);
                    int[][] rows = Enumerable.Range(0, padded.GetLength(0))
                        .Select(r => Enumerable.Range(0, padded.GetLength(1)).Select(c => padded[r, c]).ToArray())
                        .ToArray();
                    Assert.Equal(expected, rows);
                }
                else
                {
                    Assert.Equal(expected, built);

                    // The .npy holds the processor's actual tensor.
                    (long[] values, int[] shape) = ReadNpy(directory, sample, "input_ids");
                    Assert.Equal([1, built[0].Length], shape);
                    Assert.Equal(built[0], values.Select(v => checked((int)v)));
                }

                checkedSamples++;
            }

            Assert.True(checkedSamples > 0, $"{caseName} has no sample with input_ids_list.");
        }
    }

    [Theory]
    [MemberData(nameof(ModelCases))]
    public void PadLeft_BatchSamples_MatchGoldenInputIdsAndAttentionMask(string caseName)
    {
        (string directory, JsonDocument cases, int numImageTokens) = LoadCase(caseName);
        using (cases)
        {
            foreach (JsonElement sample in Samples(cases).Where(IsBatch))
            {
                int[][] prompts = TextGolden.Strings(sample.GetProperty("prompts"))
                    .Select(p => TextGolden.Tokenizer.BuildPrompt(p, numImageTokens))
                    .ToArray();

                (int[,] ids, byte[,] mask) = PaliGemmaTokenizer.PadLeft(prompts, TextGolden.Tokenizer.PadId);

                (long[] expectedIds, int[] idsShape) = ReadNpy(directory, sample, "input_ids");
                (long[] expectedMask, int[] maskShape) = ReadNpy(directory, sample, "attention_mask");
                Assert.Equal([ids.GetLength(0), ids.GetLength(1)], idsShape);
                Assert.Equal(idsShape, maskShape);
                Assert.Equal(expectedIds, ids.Cast<int>().Select(v => (long)v));
                Assert.Equal(expectedMask, mask.Cast<byte>().Select(v => (long)v));
                Assert.Contains(0L, expectedMask); // the batch really is padded
            }
        }
    }

    [Fact]
    public void BuildPromptWithSuffix_SuffixSample_MatchesGoldenIdsAndTokenTypes()
    {
        (string directory, JsonDocument cases, int numImageTokens) = LoadCase("tiny-mqa-56");
        using (cases)
        {
            JsonElement sample = Samples(cases).Single(s => s.TryGetProperty("suffix", out _));
            string prompt = TextGolden.Strings(sample.GetProperty("prompts")).Single();

            (int[] prefix, int[] suffix) = TextGolden.Tokenizer.BuildPromptWithSuffix(prompt, sample.GetProperty("suffix").GetString()!, numImageTokens);

            (long[] inputIds, _) = ReadNpy(directory, sample, "input_ids");
            (long[] tokenTypes, _) = ReadNpy(directory, sample, "token_type_ids");
            (long[] labels, _) = ReadNpy(directory, sample, "labels");
            Assert.Equal(inputIds, prefix.Concat(suffix).Select(v => (long)v));
            Assert.Equal(tokenTypes, Enumerable.Repeat(0L, prefix.Length).Concat(Enumerable.Repeat(1L, suffix.Length)));
            Assert.Equal(labels, Enumerable.Repeat(-100L, prefix.Length).Concat(suffix.Select(v => (long)v)));
            Assert.Equal(TextGolden.Tokenizer.EosId, suffix[^1]);
        }
    }

    [Theory]
    [MemberData(nameof(ModelCases))]
    public void Decode_GoldenGeneratedIds_EqualsGeneratedText(string caseName)
    {
        (_, JsonDocument cases, _) = LoadCase(caseName);
        using (cases)
        {
            foreach (JsonElement sample in Samples(cases))
            {
                if (!sample.TryGetProperty("generated_ids_list", out JsonElement generated))
                {
                    continue;
                }

                int[][] ids = generated.EnumerateArray().Select(TextGolden.Ints).ToArray();
                string[] texts = TextGolden.Strings(sample.GetProperty("generated_text"));
                Assert.Equal(texts.Length, ids.Length);
                for (int i = 0; i < ids.Length; i++)
                {
                    Assert.Equal(texts[i], TextGolden.Tokenizer.Decode(ids[i]));
                }
            }
        }
    }

    [Fact]
    public void PadLeft_EmptyAndUnevenInput_PadsOnTheLeft()
    {
        (int[,] ids, byte[,] mask) = PaliGemmaTokenizer.PadLeft([[7, 8, 9], [5], []], padId: 42);

        Assert.Equal(new int[,] { { 7, 8, 9 }, { 42, 42, 5 }, { 42, 42, 42 } }, ids);
        Assert.Equal(new byte[,] { { 1, 1, 1 }, { 0, 0, 1 }, { 0, 0, 0 } }, mask);

        (int[,] none, byte[,] noMask) = PaliGemmaTokenizer.PadLeft([], padId: 0);
        Assert.Empty(none);
        Assert.Empty(noMask);
    }

    [Fact]
    public void BuildPrompt_InvalidArguments_Throw()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => TextGolden.Tokenizer.BuildPrompt("caption en", -1));
        Assert.Throws<ArgumentNullException>(() => TextGolden.Tokenizer.BuildPrompt(null!, 4));
    }

    private static (string Directory, JsonDocument Cases, int NumImageTokens) LoadCase(string caseName)
    {
        string directory = Path.Combine(TextGolden.GoldenDirectory, caseName);
        JsonDocument cases = TextGolden.ParseJson(Path.Combine(directory, "cases.json"));
        int numImageTokens = cases.RootElement.GetProperty("config_summary").GetProperty("num_image_tokens").GetInt32();
        return (directory, cases, numImageTokens);
    }

    private static IEnumerable<JsonElement> Samples(JsonDocument cases) => cases.RootElement.GetProperty("samples").EnumerateArray();

    private static bool IsBatch(JsonElement sample) => sample.TryGetProperty("batch", out JsonElement batch) && batch.GetBoolean();

    private static (long[] Values, int[] Shape) ReadNpy(string directory, JsonElement sample, string key) =>
        TextNpy.ReadIntegers(Path.Combine(directory, sample.GetProperty("files").GetProperty(key).GetString()!));
}
