using System.Buffers.Binary;
using System.IO.Compression;
using PaliGemma.CpuOnly.Model.Imaging;

namespace PaliGemma.CpuOnly.Tests.Imaging;

/// <summary>Bad input gives a clear exception that names the file.</summary>
public sealed class ImageLoaderErrorTests : IDisposable
{
    private readonly string _directory = Directory.CreateTempSubdirectory("paligemma-imaging-").FullName;

    public void Dispose() => Directory.Delete(_directory, recursive: true);

    private static string GoldenPng => Path.Combine(GoldenImaging.GoldenDirectory, "tiny-mqa-56", "rgb_640x480.png");

    private static string GoldenJpeg => Path.Combine(GoldenImaging.GoldenDirectory, "tiny-mqa-56", "rgb_123x457.jpg");

    [Fact]
    public void MissingFile_ThrowsFileNotFound_NamingTheFile()
    {
        string path = Path.Combine(_directory, "no-such-image.png");
        var error = Assert.Throws<FileNotFoundException>(() => ImageLoader.Load(path));
        Assert.Contains(path, error.Message);
    }

    [Fact]
    public void MissingDirectory_ThrowsFileNotFound_NamingTheFile()
    {
        string path = Path.Combine(_directory, "missing-folder", "image.jpg");
        var error = Assert.Throws<FileNotFoundException>(() => ImageLoader.Load(path));
        Assert.Contains(path, error.Message);
    }

    [Theory]
    [InlineData("notes.png", "this is a text file, not a picture\n")]
    [InlineData("empty.jpg", "")]
    [InlineData("tga-like.bin", "\0\0\u0002\0\0\0\0\0\0\0\0\0\u0001\0\u0001\0\u0018\0\u00ff\u00ff\u00ff")]
    public void NonImageBytes_ThrowInvalidData_NamingTheFileAndTheSupportedFormats(string fileName, string contents)
    {
        string path = Write(fileName, contents.Select(c => (byte)c).ToArray());
        var error = Assert.Throws<InvalidDataException>(() => ImageLoader.Load(path));
        Assert.Contains($"'{path}' is not a supported image (JPEG, PNG, BMP, GIF, WebP, TIFF)", error.Message);
    }

    [Theory]
    [InlineData(0.5)]
    [InlineData(0.05)]
    public void TruncatedPng_ThrowsInvalidData_NamingTheFile(double keptFraction)
    {
        byte[] png = File.ReadAllBytes(GoldenPng);
        string path = Write("truncated.png", png[..(int)(png.Length * keptFraction)]);
        var error = Assert.Throws<InvalidDataException>(() => ImageLoader.Load(path));
        Assert.Contains($"'{path}'", error.Message);
    }

    [Theory]
    [InlineData(0.5)]
    [InlineData(0.99)]
    public void TruncatedJpeg_ThrowsInvalidData_NamingTheFile(double keptFraction)
    {
        byte[] jpeg = File.ReadAllBytes(GoldenJpeg);
        string path = Write("truncated.jpg", jpeg[..(int)(jpeg.Length * keptFraction)]);
        var error = Assert.Throws<InvalidDataException>(() => ImageLoader.Load(path));
        Assert.Contains($"'{path}'", error.Message);
        Assert.Contains("truncated", error.Message);
    }

    [Fact]
    public void JpegWithoutEndOfImageMarker_IsTruncated_AsInPil()
    {
        byte[] jpeg = File.ReadAllBytes(GoldenJpeg);
        Assert.Equal([0xFF, 0xD9], jpeg[^2..]);
        string path = Write("no-eoi.jpg", jpeg[..^2]);
        var error = Assert.Throws<InvalidDataException>(() => ImageLoader.Load(path));
        Assert.Contains($"'{path}'", error.Message);
    }

    [Fact]
    public void ImageOverMaxPixels_IsRefused_NamingTheFileAndSize()
    {
        const long pixels = 640 * 480;
        var error = Assert.Throws<InvalidDataException>(() => ImageLoader.Load(GoldenPng, maxPixels: pixels - 1));
        Assert.Contains($"'{GoldenPng}'", error.Message);
        Assert.Contains("640x480", error.Message);

        RgbImage atTheLimit = ImageLoader.Load(GoldenPng, maxPixels: pixels);
        Assert.Equal(640, atTheLimit.Width);
    }

    [Fact]
    public void HugeDimensions_AreRefusedFromTheHeader_BeforeAnyPixelIsDecoded()
    {
        // A valid PNG header for 60000 x 60000 pixels (3.6 billion) with one empty scanline of data. Were it decoded,
        // it would fail as truncated (or exhaust memory); the size check must fire first.
        byte[] png = MinimalPngHeaderOnly(60_000, 60_000);
        string path = Write("bomb.png", png);
        var error = Assert.Throws<InvalidDataException>(() => ImageLoader.Load(path));
        Assert.Contains($"'{path}'", error.Message);
        Assert.Contains("60000x60000", error.Message);
        Assert.Contains(ImageLoader.DefaultMaxPixels.ToString(System.Globalization.CultureInfo.InvariantCulture), error.Message);
    }

    [Fact]
    public void Decode_NamesTheGivenSourceInErrors()
    {
        var error = Assert.Throws<InvalidDataException>(() => ImageLoader.Decode("GIF8 but not really"u8, "upload #42"));
        Assert.Contains("'upload #42'", error.Message);
    }

    [Fact]
    public void Decode_FromMemory_EqualsLoadFromFile()
    {
        byte[] jpeg = File.ReadAllBytes(GoldenJpeg);
        Assert.Equal(ImageLoader.Load(GoldenJpeg).Pixels, ImageLoader.Decode(jpeg, "memory").Pixels);
    }

    [Fact]
    public void InvalidArguments_AreRejected()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => ImageLoader.Load(GoldenPng, maxPixels: 0));
        Assert.Throws<ArgumentException>(() => ImageLoader.Load(""));
    }

    private string Write(string fileName, byte[] contents)
    {
        string path = Path.Combine(_directory, fileName);
        File.WriteAllBytes(path, contents);
        return path;
    }

    private static byte[] MinimalPngHeaderOnly(int width, int height)
    {
        using var stream = new MemoryStream();
        stream.Write([0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A]);
        Span<byte> header = stackalloc byte[13];
        BinaryPrimitives.WriteInt32BigEndian(header, width);
        BinaryPrimitives.WriteInt32BigEndian(header[4..], height);
        header[8] = 8; // bit depth
        header[9] = 2; // RGB
        WriteChunk(stream, "IHDR", header);
        using var compressed = new MemoryStream();
        using (var zlib = new ZLibStream(compressed, CompressionLevel.Fastest, leaveOpen: true))
        {
            zlib.Write(new byte[1 + width * 3]); // a single scanline
        }

        WriteChunk(stream, "IDAT", compressed.ToArray());
        WriteChunk(stream, "IEND", []);
        return stream.ToArray();
    }

    private static void WriteChunk(Stream stream, string type, ReadOnlySpan<byte> data)
    {
        Span<byte> length = stackalloc byte[4];
        BinaryPrimitives.WriteInt32BigEndian(length, data.Length);
        stream.Write(length);
        byte[] typeAndData = [.. type.Select(c => (byte)c), .. data];
        stream.Write(typeAndData);
        BinaryPrimitives.WriteUInt32BigEndian(length, Crc32(typeAndData));
        stream.Write(length);
    }

    private static uint Crc32(ReadOnlySpan<byte> bytes)
    {
        uint crc = 0xFFFFFFFF;
        foreach (byte b in bytes)
        {
            crc ^= b;
            for (int bit = 0; bit < 8; bit++)
            {
                crc = (crc & 1) != 0 ? (crc >> 1) ^ 0xEDB88320 : crc >> 1;
            }
        }

        return ~crc;
    }
}
