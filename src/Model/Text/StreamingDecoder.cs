using System.Text;

namespace PaliGemma.CpuOnly.Model.Text;

/// <summary>
/// Incremental detokenizer for generated ids: <see cref="Push"/> returns the text completed by each id, holding back
/// byte tokens until they form a whole UTF-8 character (or prove invalid). The concatenation of every
/// <see cref="Push"/> result and a final <see cref="Flush"/> equals <see cref="PaliGemmaTokenizer.Decode"/> of the ids.
/// </summary>
public sealed class StreamingDecoder
{
    private readonly PaliGemmaTokenizer _tokenizer;
    private readonly StringBuilder _text = new();

    // A held-back sequence is at most 3 bytes (a 4-byte character missing its last byte); one more arrives per push.
    private readonly byte[] _pendingBytes = new byte[4];
    private int _pendingCount;

    public StreamingDecoder(PaliGemmaTokenizer tokenizer)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        _tokenizer = tokenizer;
    }

    /// <summary>Adds one generated id and returns the text it completes (possibly empty).</summary>
    /// <remarks>An id past the tokenizer's last piece (a padding row of the embeddings) adds no text, as in Decode.</remarks>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="id"/> is negative.</exception>
    public string Push(int id)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(id);
        if (!_tokenizer.IsValidId(id))
        {
            return "";
        }

        _text.Clear();
        if (_tokenizer.TryGetByte(id, out byte value))
        {
            _pendingBytes[_pendingCount++] = value;
            int consumed = ByteRunDecoder.Append(_pendingBytes.AsSpan(0, _pendingCount), isFinal: false, _text);
            _pendingBytes.AsSpan(consumed, _pendingCount - consumed).CopyTo(_pendingBytes);
            _pendingCount -= consumed;
        }
        else
        {
            AppendPendingBytes();
            _tokenizer.AppendTokenText(id, _text);
        }

        return _text.ToString();
    }

    /// <summary>Returns the text of any held-back bytes (U+FFFD for an unfinished character) and resets the decoder.</summary>
    public string Flush()
    {
        _text.Clear();
        AppendPendingBytes();
        return _text.ToString();
    }

    private void AppendPendingBytes()
    {
        ByteRunDecoder.Append(_pendingBytes.AsSpan(0, _pendingCount), isFinal: true, _text);
        _pendingCount = 0;
    }
}
