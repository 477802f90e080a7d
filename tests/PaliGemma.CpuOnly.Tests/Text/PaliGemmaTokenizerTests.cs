using System.Text;
using System.Text.Json;
using PaliGemma.CpuOnly.Model.Text;

namespace PaliGemma.CpuOnly.Tests.Text;

public sealed class PaliGemmaTokenizerTests
{
    public static TheoryData<int> TokenizerCaseIndices()
    {
        var data = new TheoryData<int>();
        for (int i = 0; i < TextGolden.TokenizerCaseCount; i++)
        {
            data.Add(i);
        }

        return data;
    }

    [Theory]
    [MemberData(nameof(TokenizerCaseIndices))]
    public void Encode_GoldenCase_MatchesHuggingFaceIds(int caseIndex)
    {
        JsonElement golden = TextGolden.TokenizerCase(caseIndex);
        string text = golden.GetProperty("text").GetString()!;

        int[] ids = TextGolden.Tokenizer.Encode(text);

        Assert.Equal(TextGolden.Ints(golden.GetProperty("hf_slow_gemma_ids")), ids);
    }

    [Theory]
    [MemberData(nameof(TokenizerCaseIndices))]
    public void Encode_GoldenCase_PiecesMatchSentencePieceWhereHuggingFaceAgrees(int caseIndex)
    {
        JsonElement golden = TextGolden.TokenizerCase(caseIndex);
        if (!golden.GetProperty("hf_matches_spm").GetBoolean())
        {
            // Hugging Face reads <bos>/<eos> in text as special tokens, sentencepiece does not; HF is the target.
            return;
        }

        int[] ids = TextGolden.Tokenizer.Encode(golden.GetProperty("text").GetString()!);

        Assert.Equal(TextGolden.Ints(golden.GetProperty("ids")), ids);
        Assert.Equal(TextGolden.Strings(golden.GetProperty("pieces")), ids.Select(id => TextGolden.Tokenizer.IdToPiece(id)));
    }

    [Theory]
    [MemberData(nameof(TokenizerCaseIndices))]
    public void Decode_GoldenCase_ReturnsDecodedText(int caseIndex)
    {
        JsonElement golden = TextGolden.TokenizerCase(caseIndex);
        string decoded = golden.GetProperty("decoded").GetString()!;

        Assert.Equal(decoded, TextGolden.Tokenizer.Decode(TextGolden.Ints(golden.GetProperty("hf_slow_gemma_ids"))));
        Assert.Equal(decoded, TextGolden.Tokenizer.Decode(TextGolden.Ints(golden.GetProperty("ids"))));
    }

    [Fact]
    public void SpecialIds_FoundByPieceName_MatchGolden()
    {
        PaliGemmaTokenizer tokenizer = TextGolden.Tokenizer;
        JsonElement root = TextGolden.TokenizerCasesRoot;
        JsonElement special = root.GetProperty("special_ids");

        Assert.Equal(root.GetProperty("piece_size").GetInt32(), tokenizer.PieceCount);
        Assert.Equal(special.GetProperty("<bos>").GetInt32(), tokenizer.BosId);
        Assert.Equal(special.GetProperty("<eos>").GetInt32(), tokenizer.EosId);
        Assert.Equal(special.GetProperty("<pad>").GetInt32(), tokenizer.PadId);
        Assert.Equal(special.GetProperty("<image>").GetInt32(), tokenizer.ImageTokenId);
        foreach (JsonProperty property in special.EnumerateObject())
        {
            Assert.Equal(property.Value.GetInt32(), tokenizer.PieceToId(property.Name));
            Assert.Equal(property.Name, tokenizer.IdToPiece(property.Value.GetInt32()));
        }
    }

    [Fact]
    public void IdToPiece_OutOfRange_ReturnsNull_AndPieceToIdUnknownReturnsNull()
    {
        PaliGemmaTokenizer tokenizer = TextGolden.Tokenizer;

        Assert.Null(tokenizer.IdToPiece(-1));
        Assert.Null(tokenizer.IdToPiece(tokenizer.PieceCount));
        Assert.Null(tokenizer.PieceToId("no such piece"));
    }

    [Fact]
    public void Decode_NegativeId_Throws_AndIdsPastTheLastPieceDecodeToNothing()
    {
        PaliGemmaTokenizer tokenizer = TextGolden.Tokenizer;

        Assert.Throws<ArgumentOutOfRangeException>(() => tokenizer.Decode([-1]));
        // Embedding rows past the tokenizer (the golden models have 2304 rows for 2300 pieces) can be generated.
        Assert.Equal(tokenizer.Decode([5, 6]), tokenizer.Decode([5, tokenizer.PieceCount, 6, tokenizer.PieceCount + 3]));
    }

    [Fact]
    public void DecodeToken_EveryId_EqualsDecodeOfThatId()
    {
        PaliGemmaTokenizer tokenizer = TextGolden.Tokenizer;

        for (int id = 0; id < tokenizer.PieceCount; id++)
        {
            Assert.Equal(tokenizer.Decode([id]), tokenizer.DecodeToken(id));
        }

        Assert.Equal("<bos>", tokenizer.DecodeToken(tokenizer.BosId));
        Assert.Equal(" ", tokenizer.DecodeToken(tokenizer.PieceToId("\u2581")!.Value));
        Assert.Equal("\uFFFD", tokenizer.DecodeToken(tokenizer.PieceToId("<0xC3>")!.Value));
        Assert.Equal("\n", tokenizer.DecodeToken(tokenizer.PieceToId("<0x0A>")!.Value));
    }

    [Fact]
    public void Decode_InvalidUtf8Bytes_GivesOneReplacementPerByte_LikeSentencePiece()
    {
        PaliGemmaTokenizer tokenizer = TextGolden.Tokenizer;
        int[] Bytes(params byte[] values) => values.Select(b => tokenizer.PieceToId($"<0x{b:X2}>")!.Value).ToArray();

        // Truncated 3-byte sequence, then a valid one: sentencepiece replaces each stray byte (Python's 'replace'
        // would give one U+FFFD for the truncated pair).
        Assert.Equal("\uFFFD\uFFFD東", tokenizer.Decode(Bytes(0xE6, 0x9D, 0xE6, 0x9D, 0xB1)));
        // Overlong encoding of '/', a surrogate, and a code point above U+10FFFF are invalid too.
        Assert.Equal("\uFFFD\uFFFD", tokenizer.Decode(Bytes(0xC0, 0xAF)));
        Assert.Equal("\uFFFD\uFFFD\uFFFD", tokenizer.Decode(Bytes(0xED, 0xA0, 0x80)));
        Assert.Equal("\uFFFD\uFFFD\uFFFD\uFFFD", tokenizer.Decode(Bytes(0xF4, 0x90, 0x80, 0x80)));
        // A byte run is cut by a non-byte token.
        int a = tokenizer.PieceToId("a")!.Value;
        Assert.Equal("\uFFFDa\uFFFD", tokenizer.Decode([.. Bytes(0xC3), a, .. Bytes(0xA9)]));
    }

    [Fact]
    public void EncodeThenDecode_RandomText_RoundTrips()
    {
        PaliGemmaTokenizer tokenizer = TextGolden.Tokenizer;
        string[] alphabet =
        [
            "a", "e", "t", "h", "o", " ", " ", "  ", "\n", "\t", "Z", "7", "0", ".", "?", "<", ">", "loc", "é", "ß", "東", "🐝",
            "<image>", "<bos>", "<eos>", "<pad>", "<unk>", "<loc0000>", "<loc1023>", "<seg064>", "<loc12", "\u2581",
        ];
        var random = new Random(1234);
        for (int trial = 0; trial < 300; trial++)
        {
            var text = new StringBuilder();
            int parts = random.Next(0, 20);
            for (int i = 0; i < parts; i++)
            {
                text.Append(alphabet[random.Next(alphabet.Length)]);
            }

            string expected = text.ToString();
            int[] ids = tokenizer.Encode(expected);
            // U+2581 typed in the text is indistinguishable from an escaped space, as in sentencepiece.
            Assert.Equal(expected.Replace('\u2581', ' '), tokenizer.Decode(ids));
        }
    }

    [Fact]
    public void Encode_SpecialTokensInsideText_AreSingleTokens()
    {
        PaliGemmaTokenizer tokenizer = TextGolden.Tokenizer;

        int[] ids = tokenizer.Encode("<image><bos>x<eos><pad><loc0042><seg007>");

        Assert.Equal(
            [tokenizer.ImageTokenId, tokenizer.BosId, tokenizer.PieceToId("x")!.Value, tokenizer.EosId, tokenizer.PadId,
             tokenizer.PieceToId("<loc0042>")!.Value, tokenizer.PieceToId("<seg007>")!.Value],
            ids);
        // Hugging Face registers <unk> as an added token too, so typed "<unk>" is the unknown id, not five bytes.
        Assert.Equal([tokenizer.PieceToId("<unk>")!.Value], tokenizer.Encode("<unk>"));
        // A near miss stays plain text (encoded on its own), and the token right after it is still found.
        Assert.Equal([.. tokenizer.Encode("<loc12"), tokenizer.PieceToId("<loc0012>")!.Value], tokenizer.Encode("<loc12<loc0012>"));
        Assert.Equal(tokenizer.PieceToId("<0x3C>"), tokenizer.Encode("<loc12")[0]);
    }

    [Fact]
    public void Encode_ThreeSpaces_MergesTheLeftmostOfEqualPairsFirst()
    {
        // "▁▁▁" can merge at (0,1) or (1,2) with the same score; sentencepiece takes the leftmost (golden: [▁▁, ▁]).
        // Microsoft.ML.Tokenizers 2.0.1 takes the rightmost, which is why BPE is done by SentencePieceBpe.
        PaliGemmaTokenizer tokenizer = TextGolden.Tokenizer;

        Assert.Equal(["\u2581\u2581", "\u2581"], tokenizer.Encode("   ").Select(tokenizer.IdToPiece));
        Assert.Equal(["i", "ss", "s"], tokenizer.Encode("isss").Select(tokenizer.IdToPiece));
    }

    [Fact]
    public void Encode_UnusedPiece_IsSplitBackIntoTheMergedParts()
    {
        // "▁the" is formed as ▁,t,h,e -> ▁,t,he -> ▁t,he -> ▁the. Marked UNUSED (type 5), sentencepiece outputs the two
        // pieces of its last merge instead.
        byte[] model = TestModelProto.WithPieceType(File.ReadAllBytes(TextGolden.TokenizerModelPath), "\u2581the", type: 5);
        using var stream = new MemoryStream(model);
        PaliGemmaTokenizer tokenizer = PaliGemmaTokenizer.Load(stream, "unused-the.model");

        Assert.Equal([TextGolden.Tokenizer.PieceToId("\u2581the")!.Value], TextGolden.Tokenizer.Encode(" the"));
        Assert.Equal(["\u2581t", "he"], tokenizer.Encode(" the").Select(tokenizer.IdToPiece));
        Assert.Equal(" the cat", tokenizer.Decode(tokenizer.Encode(" the cat")));
    }

    [Fact]
    public void Load_MissingFile_ThrowsFileNotFoundNamingThePath()
    {
        string path = Path.Combine(Path.GetTempPath(), $"paligemma-missing-{Guid.NewGuid():N}", "tokenizer.model");

        var exception = Assert.Throws<FileNotFoundException>(() => PaliGemmaTokenizer.Load(path));

        Assert.Contains(path, exception.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Load_TruncatedFile_ThrowsInvalidDataNamingThePath()
    {
        byte[] model = File.ReadAllBytes(TextGolden.TokenizerModelPath);
        string path = Path.Combine(Path.GetTempPath(), $"paligemma-truncated-{Guid.NewGuid():N}.model");
        File.WriteAllBytes(path, model.AsSpan(0, model.Length / 2).ToArray());
        try
        {
            var exception = Assert.Throws<InvalidDataException>(() => PaliGemmaTokenizer.Load(path));

            Assert.Contains(path, exception.Message, StringComparison.Ordinal);
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Theory]
    [InlineData("")]
    [InlineData("this is not a sentencepiece model")]
    [InlineData("{\"model\": \"tokenizer.json\"}")]
    public void Load_CorruptStream_ThrowsInvalidDataNamingTheSource(string content)
    {
        using var stream = new MemoryStream(Encoding.UTF8.GetBytes(content));

        var exception = Assert.Throws<InvalidDataException>(() => PaliGemmaTokenizer.Load(stream, "corrupt.model"));

        Assert.Contains("corrupt.model", exception.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Load_ModelWithoutImagePiece_AppendsImageTokenAfterThePieces()
    {
        // The hub's PaliGemma tokenizer.model has no <image> piece: PaliGemmaProcessor adds it as id len(tokenizer).
        byte[] model = TestModelProto.WithoutPiece(File.ReadAllBytes(TextGolden.TokenizerModelPath), "<image>");
        using var stream = new MemoryStream(model);

        PaliGemmaTokenizer tokenizer = PaliGemmaTokenizer.Load(stream, "no-image.model");

        Assert.Equal(TextGolden.Tokenizer.PieceCount - 1, tokenizer.PieceCount);
        Assert.Equal(tokenizer.PieceCount, tokenizer.ImageTokenId);
        Assert.Equal("<image>", tokenizer.IdToPiece(tokenizer.ImageTokenId));
        Assert.Equal([tokenizer.ImageTokenId, tokenizer.ImageTokenId, tokenizer.BosId, 302, 273, 14], tokenizer.BuildPrompt("caption en", 2));
        Assert.Equal("<image><bos>caption en\n", tokenizer.Decode(tokenizer.BuildPrompt("caption en", 1)));
    }
}
