using System.Text;
using System.Text.Json;
using PaliGemma.CpuOnly.Model.Text;

namespace PaliGemma.CpuOnly.Tests.Text;

public sealed class StreamingDecoderTests
{
    [Fact]
    public void Push_GoldenGeneratedIds_ConcatenationEqualsDecode()
    {
        int checkedSequences = 0;
        foreach (string caseName in TextGolden.ModelCases())
        {
            using JsonDocument cases = TextGolden.ParseJson(Path.Combine(TextGolden.GoldenDirectory, caseName, "cases.json"));
            foreach (JsonElement sample in cases.RootElement.GetProperty("samples").EnumerateArray())
            {
                if (sample.TryGetProperty("generated_ids_list", out JsonElement generated))
                {
                    foreach (int[] ids in generated.EnumerateArray().Select(TextGolden.Ints))
                    {
                        Assert.Equal(TextGolden.Tokenizer.Decode(ids), Stream(ids));
                        checkedSequences++;
                    }
                }
            }
        }

        Assert.True(checkedSequences > 0);
    }

    [Fact]
    public void Push_RandomByteHeavyIds_ConcatenationEqualsDecode()
    {
        PaliGemmaTokenizer tokenizer = TextGolden.Tokenizer;
        int firstByte = tokenizer.PieceToId("<0x00>")!.Value;
        int[] utf8Leads = [0xC3, 0xE2, 0xE6, 0xF0, 0xF4, 0xF5, 0xED, 0xC0];
        var random = new Random(42);
        for (int trial = 0; trial < 500; trial++)
        {
            var ids = new int[random.Next(0, 24)];
            for (int i = 0; i < ids.Length; i++)
            {
                ids[i] = random.Next(4) switch
                {
                    0 => random.Next(tokenizer.PieceCount),                     // any token
                    1 => firstByte + utf8Leads[random.Next(utf8Leads.Length)],  // lead bytes
                    _ => firstByte + 0x80 + random.Next(0x40),                  // continuation bytes
                };
            }

            Assert.Equal(tokenizer.Decode(ids), Stream(ids));
        }
    }

    [Fact]
    public void Push_MultiByteCharacter_IsHeldBackUntilComplete()
    {
        PaliGemmaTokenizer tokenizer = TextGolden.Tokenizer;
        int[] bee = tokenizer.Encode("🐝"); // 4 byte tokens
        Assert.Equal(4, bee.Length);
        var decoder = new StreamingDecoder(tokenizer);

        Assert.Equal("", decoder.Push(bee[0]));
        Assert.Equal("", decoder.Push(bee[1]));
        Assert.Equal("", decoder.Push(bee[2]));
        Assert.Equal("🐝", decoder.Push(bee[3]));
        Assert.Equal("", decoder.Flush());
    }

    [Fact]
    public void Flush_UnfinishedCharacter_ReplacesEachByte()
    {
        PaliGemmaTokenizer tokenizer = TextGolden.Tokenizer;
        int[] bee = tokenizer.Encode("🐝");
        var decoder = new StreamingDecoder(tokenizer);

        decoder.Push(bee[0]);
        decoder.Push(bee[1]);

        Assert.Equal("\uFFFD\uFFFD", decoder.Flush());
        Assert.Equal("a", decoder.Push(tokenizer.PieceToId("a")!.Value)); // nothing left over after Flush
    }

    [Fact]
    public void Push_NonByteTokenAfterUnfinishedBytes_EmitsReplacementThenToken()
    {
        PaliGemmaTokenizer tokenizer = TextGolden.Tokenizer;
        var decoder = new StreamingDecoder(tokenizer);

        Assert.Equal("", decoder.Push(tokenizer.PieceToId("<0xC3>")!.Value));
        Assert.Equal("\uFFFD<loc0001>", decoder.Push(tokenizer.PieceToId("<loc0001>")!.Value));
    }

    [Fact]
    public void Push_NegativeId_Throws_AndAnIdPastTheLastPieceAddsNoText()
    {
        var decoder = new StreamingDecoder(TextGolden.Tokenizer);

        Assert.Throws<ArgumentOutOfRangeException>(() => decoder.Push(-1));
        Assert.Equal("", decoder.Push(TextGolden.Tokenizer.PieceCount));
    }

    private static string Stream(int[] ids)
    {
        var decoder = new StreamingDecoder(TextGolden.Tokenizer);
        var text = new StringBuilder();
        foreach (int id in ids)
        {
            text.Append(decoder.Push(id));
        }

        return text.Append(decoder.Flush()).ToString();
    }
}
