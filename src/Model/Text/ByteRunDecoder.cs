using System.Text;

namespace PaliGemma.CpuOnly.Model.Text;

/// <summary>
/// Turns a run of byte-fallback tokens back into text the way SentencePiece's decoder does (and therefore the way the
/// Hugging Face slow Gemma tokenizer does): each well-formed UTF-8 sequence becomes its character, and every byte that
/// does not start a well-formed sequence becomes one U+FFFD. This differs from <see cref="Encoding.UTF8"/>, which
/// replaces a truncated sequence as a whole.
/// </summary>
internal static class ByteRunDecoder
{
    private const char ReplacementCharacter = '\uFFFD';

    /// <summary>
    /// Appends the text of <paramref name="bytes"/> to <paramref name="destination"/>. When <paramref name="isFinal"/> is
    /// false, a trailing sequence that could still become valid with more bytes is left undecoded.
    /// </summary>
    /// <returns>The number of bytes consumed (always <c>bytes.Length</c> when <paramref name="isFinal"/>).</returns>
    public static int Append(ReadOnlySpan<byte> bytes, bool isFinal, StringBuilder destination)
    {
        Span<char> utf16 = stackalloc char[2];
        int position = 0;
        while (position < bytes.Length)
        {
            switch (DecodeOne(bytes[position..], isFinal, out Rune rune))
            {
                case Step.Valid:
                    destination.Append(utf16[..rune.EncodeToUtf16(utf16)]);
                    position += rune.Utf8SequenceLength;
                    break;
                case Step.Invalid:
                    destination.Append(ReplacementCharacter);
                    position++;
                    break;
                default:
                    return position;
            }
        }

        return position;
    }

    private enum Step
    {
        Valid,
        Invalid,
        NeedMoreData,
    }

    // Mirrors sentencepiece's string_util::DecodeUTF8: the lead byte fixes the length, continuation bytes must be
    // 10xxxxxx, and overlong forms, surrogates and code points above U+10FFFF are rejected.
    private static Step DecodeOne(ReadOnlySpan<byte> bytes, bool isFinal, out Rune rune)
    {
        rune = default;
        byte lead = bytes[0];
        if (lead < 0x80)
        {
            rune = new Rune(lead);
            return Step.Valid;
        }

        int length;
        int codePoint;
        int minimum;
        if ((lead & 0xE0) == 0xC0)
        {
            (length, codePoint, minimum) = (2, lead & 0x1F, 0x80);
        }
        else if ((lead & 0xF0) == 0xE0)
        {
            (length, codePoint, minimum) = (3, lead & 0x0F, 0x800);
        }
        else if ((lead & 0xF8) == 0xF0)
        {
            (length, codePoint, minimum) = (4, lead & 0x07, 0x10000);
        }
        else
        {
            return Step.Invalid;
        }

        int available = Math.Min(length, bytes.Length);
        for (int i = 1; i < available; i++)
        {
            if ((bytes[i] & 0xC0) != 0x80)
            {
                return Step.Invalid;
            }

            codePoint = (codePoint << 6) | (bytes[i] & 0x3F);
        }

        if (available < length)
        {
            // A truncated sequence is invalid once the run is complete; until then more bytes may finish it.
            return isFinal ? Step.Invalid : Step.NeedMoreData;
        }

        if (codePoint < minimum || !Rune.IsValid(codePoint))
        {
            return Step.Invalid;
        }

        rune = new Rune(codePoint);
        return Step.Valid;
    }
}
