namespace PaliGemma.CpuOnly.Tests.Text;

/// <summary>Edits a serialized SentencePiece ModelProto at the wire level, to make test variants of tokenizer.model.</summary>
internal static class TestModelProto
{
    /// <summary>Copies <paramref name="model"/> without the piece entry whose text is <paramref name="piece"/>.</summary>
    public static byte[] WithoutPiece(byte[] model, string piece) => RewritePiece(model, piece, _ => null);

    /// <summary>Copies <paramref name="model"/> with the type (ModelProto.SentencePiece.Type) of one piece changed.</summary>
    public static byte[] WithPieceType(byte[] model, string piece, int type) => RewritePiece(model, piece, message =>
    {
        using var output = new MemoryStream();
        int position = 0;
        while (position < message.Length)
        {
            int start = position;
            int field = (int)(ReadVarint(message, ref position) >> 3);
            SkipPayload(message, ref position, wireType: message[start] & 7);
            if (field != 3)
            {
                output.Write(message, start, position - start);
            }
        }

        output.WriteByte(3 << 3); // field 3, varint
        output.WriteByte(checked((byte)type));
        return output.ToArray();
    });

    private static byte[] RewritePiece(byte[] model, string piece, Func<byte[], byte[]?> rewrite)
    {
        byte[] pieceText = System.Text.Encoding.UTF8.GetBytes(piece);
        using var output = new MemoryStream();
        int position = 0;
        int matches = 0;
        while (position < model.Length)
        {
            int start = position;
            ulong tag = ReadVarint(model, ref position);
            if (tag != (1 << 3 | 2))
            {
                SkipPayload(model, ref position, (int)(tag & 7));
                output.Write(model, start, position - start);
                continue;
            }

            int length = (int)ReadVarint(model, ref position);
            byte[] message = model.AsSpan(position, length).ToArray();
            position += length;
            if (!PieceTextEquals(message, pieceText))
            {
                output.Write(model, start, position - start);
                continue;
            }

            matches++;
            byte[]? replacement = rewrite(message);
            if (replacement is not null)
            {
                output.WriteByte(1 << 3 | 2);
                WriteVarint(output, (ulong)replacement.Length);
                output.Write(replacement);
            }
        }

        if (matches != 1)
        {
            throw new InvalidOperationException($"expected one '{piece}' piece, found {matches}.");
        }

        return output.ToArray();
    }

    private static bool PieceTextEquals(byte[] message, ReadOnlySpan<byte> text)
    {
        int position = 0;
        while (position < message.Length)
        {
            int start = position;
            ulong tag = ReadVarint(message, ref position);
            if (tag == (1 << 3 | 2))
            {
                int length = (int)ReadVarint(message, ref position);
                return message.AsSpan(position, length).SequenceEqual(text);
            }

            SkipPayload(message, ref position, message[start] & 7);
        }

        return false;
    }

    private static void SkipPayload(byte[] data, ref int position, int wireType)
    {
        switch (wireType)
        {
            case 0:
                ReadVarint(data, ref position);
                break;
            case 1:
                position += 8;
                break;
            case 2:
                int length = (int)ReadVarint(data, ref position);
                position += length;
                break;
            case 5:
                position += 4;
                break;
            default:
                throw new InvalidDataException($"wire type {wireType}");
        }
    }

    private static ulong ReadVarint(byte[] data, ref int position)
    {
        ulong result = 0;
        for (int shift = 0; ; shift += 7)
        {
            byte b = data[position++];
            result |= (ulong)(b & 0x7F) << shift;
            if (b < 0x80)
            {
                return result;
            }
        }
    }

    private static void WriteVarint(Stream output, ulong value)
    {
        while (value >= 0x80)
        {
            output.WriteByte((byte)(value | 0x80));
            value >>= 7;
        }

        output.WriteByte((byte)value);
    }
}
