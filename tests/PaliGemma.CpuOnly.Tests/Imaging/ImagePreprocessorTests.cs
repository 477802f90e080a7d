using FsCheck;
using FsCheck.Xunit;
using PaliGemma.CpuOnly.Model.Imaging;

namespace PaliGemma.CpuOnly.Tests.Imaging;

public sealed class ImagePreprocessorTests
{
    [Fact]
    public void PixelValues_AreChannelsFirst_WithZeroAt_MinusOne_And255At_One()
    {
        // Already at the target size, so no resampling: each plane holds one channel.
        var pixels = new byte[2 * 2 * 3];
        for (int i = 0; i < 4; i++)
        {
            (pixels[3 * i], pixels[3 * i + 1], pixels[3 * i + 2]) = ((byte)0, (byte)255, (byte)(i == 3 ? 255 : 0));
        }

        float[] values = ImagePreprocessor.ToPixelValues(new RgbImage(2, 2, pixels), 2);

        Assert.Equal(new float[] { -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, 1 }, values);
    }

    [Fact]
    public void SpanOverload_WritesTheSameValues_AndChecksTheLength()
    {
        RgbImage image = RandomImage(31, 17, seed: 3);
        float[] expected = ImagePreprocessor.ToPixelValues(image, 14);
        var destination = new float[3 * 14 * 14];

        ImagePreprocessor.ToPixelValues(image, 14, destination);

        Assert.Equal(expected, destination);
        var error = Assert.Throws<ArgumentException>(() => ImagePreprocessor.ToPixelValues(image, 14, new float[3 * 14 * 14 - 1]));
        Assert.Equal("destination", error.ParamName);
    }

    [Fact]
    public void PixelValues_HaveOneValuePerByteLevel_InOrder()
    {
        // A 256-pixel image holding every level once: values rise strictly and stay inside [-1, 1].
        var pixels = new byte[16 * 16 * 3];
        for (int i = 0; i < 256; i++)
        {
            pixels[3 * i] = pixels[3 * i + 1] = pixels[3 * i + 2] = (byte)i;
        }

        float[] red = ImagePreprocessor.ToPixelValues(new RgbImage(16, 16, pixels), 16)[..256];

        for (int i = 1; i < 256; i++)
        {
            Assert.True(red[i] > red[i - 1], $"level {i}");
        }

        Assert.Equal(-1f, red[0]);
        Assert.Equal(1f, red[255]);
    }

    [Fact]
    public void Bicubic_ToTheSameSize_ReturnsAnEqualCopy()
    {
        RgbImage image = RandomImage(9, 4, seed: 1);
        RgbImage copy = PilResize.Bicubic(image, 9, 4);
        Assert.Equal(image.Pixels, copy.Pixels);
        Assert.NotSame(image.Pixels, copy.Pixels);
    }

    [Property(MaxTest = 60)]
    public bool Bicubic_KeepsAConstantImageConstant(PositiveInt sourceWidth, PositiveInt sourceHeight, PositiveInt width, PositiveInt height, byte red, byte green, byte blue)
    {
        // The fixed-point weights of each output sum to 1 within a few units of 2^-22, which cannot move a constant.
        int sw = sourceWidth.Get % 300 + 1, sh = sourceHeight.Get % 300 + 1, w = width.Get % 300 + 1, h = height.Get % 300 + 1;
        var pixels = new byte[sw * sh * 3];
        for (int i = 0; i < sw * sh; i++)
        {
            (pixels[3 * i], pixels[3 * i + 1], pixels[3 * i + 2]) = (red, green, blue);
        }

        RgbImage resized = PilResize.Bicubic(new RgbImage(sw, sh, pixels), w, h);
        for (int i = 0; i < w * h; i++)
        {
            if (resized.Pixels[3 * i] != red || resized.Pixels[3 * i + 1] != green || resized.Pixels[3 * i + 2] != blue)
            {
                return false;
            }
        }

        return true;
    }

    [Fact]
    public void RgbImage_RejectsABufferOfTheWrongSize()
    {
        Assert.Throws<ArgumentException>(() => new RgbImage(2, 2, new byte[11]));
        Assert.Throws<ArgumentOutOfRangeException>(() => new RgbImage(0, 2, []));
        Assert.Throws<ArgumentOutOfRangeException>(() => PilResize.Bicubic(RandomImage(2, 2, seed: 0), 0, 3));
    }

    private static RgbImage RandomImage(int width, int height, int seed)
    {
        var pixels = new byte[width * height * 3];
        new Random(seed).NextBytes(pixels);
        return new RgbImage(width, height, pixels);
    }
}
