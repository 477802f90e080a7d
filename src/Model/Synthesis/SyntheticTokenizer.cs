using System.Buffers;
using System.Buffers.Binary;
using System.Globalization;
using System.Text;

namespace PaliGemma.CpuOnly.Model.Synthesis;

/// <summary>
/// A made-up SentencePiece BPE <c>tokenizer.model</c> laid out like PaliGemma's, for random-weight checkpoints: one piece
/// per embedding row, so every id a random model can produce decodes.
/// </summary>
/// <remarks>
/// Ids: <c>&lt;pad&gt;</c> 0, <c>&lt;eos&gt;</c> 1, <c>&lt;bos&gt;</c> 2 (control), <c>&lt;unk&gt;</c> 3, the 256 byte
/// pieces <c>&lt;0x00&gt;</c>..<c>&lt;0xFF&gt;</c> (byte fallback), the single characters ▁, printable ASCII, \n and \t,
/// then merge pieces (lower-case letter n-grams, optionally after ▁, shorter ones merging first). The 1024
/// <c>&lt;locNNNN&gt;</c> and 128 <c>&lt;segNNN&gt;</c> user-defined pieces sit just before <c>&lt;image&gt;</c> (as in
/// PaliGemma, where they are 256000..257151 and <c>&lt;image&gt;</c> is 257152), or just after it when there is no room.
/// Normalizer and trainer flags are Gemma's: identity normalizer, no dummy prefix, whitespace kept, byte fallback.
/// </remarks>
public static class SyntheticTokenizer
{
    private const int LocationCount = 1024;
    private const int SegmentCount = 128;
    private const string Letters = "abcdefghijklmnopqrstuvwxyz";
    private const char WordStart = '\u2581';

    // ModelProto.SentencePiece.Type
    private const int TypeNormal = 1, TypeUnknown = 2, TypeControl = 3, TypeUserDefined = 4, TypeByte = 6;

    private static readonly string[] SpecialPieces = ["<pad>", "<eos>", "<bos>", "<unk>"];

    /// <summary>The fewest pieces a model can have: specials, bytes, single characters, locations, segments and &lt;image&gt;.</summary>
    public static int MinimumVocabSize => SpecialPieces.Length + 256 + BaseCharacters().Count() + LocationCount + SegmentCount + 1;

    /// <summary>Serialized ModelProto with exactly <paramref name="vocabSize"/> pieces and &lt;image&gt; at <paramref name="imageTokenIndex"/>.</summary>
    public static byte[] Build(int vocabSize, int imageTokenIndex)
    {
        var pieces = Pieces(vocabSize, imageTokenIndex);
        var writer = new ArrayBufferWriter<byte>(vocabSize * 16);
        var message = new ArrayBufferWriter<byte>(64);
        foreach (var (text, score, type) in pieces)
        {
            message.ResetWrittenCount();
            WriteString(message, 1, text);
            if (score != 0f) WriteFloat(message, 2, score);
            if (type != TypeNormal) WriteVarintField(message, 3, (ulong)type);
            WriteBytesField(writer, 1, message.WrittenSpan);
        }

        message.ResetWrittenCount();
        WriteVarintField(message, 3, 2);                 // model_type: BPE
        WriteVarintField(message, 4, (ulong)vocabSize);  // vocab_size
        WriteVarintField(message, 25, 1);                // split_digits
        WriteVarintField(message, 35, 1);                // byte_fallback
        WriteVarintField(message, 40, 3);                // unk_id
        WriteVarintField(message, 41, 2);                // bos_id
        WriteVarintField(message, 42, 1);                // eos_id
        WriteVarintField(message, 43, 0);                // pad_id
        WriteBytesField(writer, 2, message.WrittenSpan);

        message.ResetWrittenCount();
        WriteString(message, 1, "identity");             // name
        WriteVarintField(message, 3, 0);                 // add_dummy_prefix
        WriteVarintField(message, 4, 0);                 // remove_extra_whitespaces
        WriteVarintField(message, 5, 1);                 // escape_whitespaces
        WriteBytesField(writer, 3, message.WrittenSpan);
        return writer.WrittenSpan.ToArray();
    }

    /// <summary>The pieces in id order: text, score (BPE merge priority, higher first) and ModelProto type.</summary>
    internal static List<(string Text, float Score, int Type)> Pieces(int vocabSize, int imageTokenIndex)
    {
        int minimum = MinimumVocabSize;
        if (vocabSize < minimum)
            throw new ArgumentOutOfRangeException(nameof(vocabSize), vocabSize, $"a synthetic PaliGemma tokenizer needs at least {minimum} pieces (text_config.vocab_size)");
        if ((uint)imageTokenIndex >= (uint)vocabSize)
            throw new ArgumentOutOfRangeException(nameof(imageTokenIndex), imageTokenIndex, $"image_token_index must be inside the vocabulary (0..{vocabSize - 1})");

        int fixedPrefix = SpecialPieces.Length + 256 + BaseCharacters().Count();
        if (imageTokenIndex < fixedPrefix)
            throw new ArgumentOutOfRangeException(nameof(imageTokenIndex), imageTokenIndex, $"image_token_index must be at least {fixedPrefix} (after the special, byte and character pieces)");
        const int markerCount = LocationCount + SegmentCount;
        int markersStart = imageTokenIndex - markerCount >= fixedPrefix ? imageTokenIndex - markerCount
            : imageTokenIndex + 1 + markerCount <= vocabSize ? imageTokenIndex + 1
            : throw new ArgumentOutOfRangeException(nameof(imageTokenIndex), imageTokenIndex,
                $"no room for the {markerCount} <loc>/<seg> pieces next to <image> in a vocabulary of {vocabSize}");

        var pieces = new List<(string, float, int)>(vocabSize);
        foreach (string special in SpecialPieces) pieces.Add((special, 0f, special == "<unk>" ? TypeUnknown : TypeControl));
        for (int b = 0; b < 256; b++) pieces.Add((string.Create(CultureInfo.InvariantCulture, $"<0x{b:X2}>"), 0f, TypeByte));

        int normalRank = 0;
        foreach (string c in BaseCharacters()) pieces.Add((c, -normalRank++, TypeNormal));
        using var merges = MergePieces().GetEnumerator();
        while (pieces.Count < vocabSize)
        {
            int id = pieces.Count;
            if (id == markersStart)
            {
                for (int i = 0; i < LocationCount; i++) pieces.Add((string.Create(CultureInfo.InvariantCulture, $"<loc{i:D4}>"), 0f, TypeUserDefined));
                for (int i = 0; i < SegmentCount; i++) pieces.Add((string.Create(CultureInfo.InvariantCulture, $"<seg{i:D3}>"), 0f, TypeUserDefined));
            }
            else if (id == imageTokenIndex)
            {
                pieces.Add(("<image>", 0f, TypeUserDefined));
            }
            else
            {
                merges.MoveNext();
                pieces.Add((merges.Current, -normalRank++, TypeNormal));
            }
        }
        return pieces;
    }

    private static IEnumerable<string> BaseCharacters()
    {
        yield return WordStart.ToString();
        for (char c = '!'; c <= '~'; c++) yield return c.ToString();
        yield return "\n";
        yield return "\t";
    }

    /// <summary>Letter n-grams of length 2, 3, ..., each optionally starting with ▁: every one is a merge of two shorter pieces.</summary>
    private static IEnumerable<string> MergePieces()
    {
        var builder = new StringBuilder();
        for (int length = 2; ; length++)
        {
            // First symbol from ▁ + letters (27), the rest letters (26); enumerate as a mixed-radix counter.
            long count = 27;
            for (int i = 1; i < length; i++) count *= 26;
            var digits = new int[length];
            for (long n = 0; n < count; n++)
            {
                builder.Clear();
                long rest = n;
                for (int i = length - 1; i >= 1; i--)
                {
                    digits[i] = (int)(rest % 26);
                    rest /= 26;
                }
                digits[0] = (int)rest;
                builder.Append(digits[0] == 26 ? WordStart : Letters[digits[0]]);
                for (int i = 1; i < length; i++) builder.Append(Letters[digits[i]]);
                yield return builder.ToString();
            }
        }
    }

    private static void WriteVarint(IBufferWriter<byte> writer, ulong value)
    {
        Span<byte> span = writer.GetSpan(10);
        int n = 0;
        while (value >= 0x80)
        {
            span[n++] = (byte)(value | 0x80);
            value >>= 7;
        }
        span[n++] = (byte)value;
        writer.Advance(n);
    }

    private static void WriteVarintField(IBufferWriter<byte> writer, int field, ulong value)
    {
        WriteVarint(writer, (ulong)field << 3);
        WriteVarint(writer, value);
    }

    private static void WriteFloat(IBufferWriter<byte> writer, int field, float value)
    {
        WriteVarint(writer, (ulong)field << 3 | 5);
        BinaryPrimitives.WriteSingleLittleEndian(writer.GetSpan(4), value);
        writer.Advance(4);
    }

    private static void WriteBytesField(IBufferWriter<byte> writer, int field, ReadOnlySpan<byte> bytes)
    {
        WriteVarint(writer, (ulong)field << 3 | 2);
        WriteVarint(writer, (ulong)bytes.Length);
        writer.Write(bytes);
    }

    private static void WriteString(IBufferWriter<byte> writer, int field, string text) =>
        WriteBytesField(writer, field, Encoding.UTF8.GetBytes(text));
}
